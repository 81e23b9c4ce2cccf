"""The pancreas region of interest, in physical space.

One type everywhere: :class:`ROI` = a box with a centre and a size in millimetres and its own axes,
expressed in patient RAS coordinates (as Slicer shows them). It is built from

* a Slicer markups ROI file (``.mrk.json``, LPS or RAS ``coordinateSystem``, ``center``, ``size``,
  ``orientation``), as ``vtkMRMLMarkupsROIJsonStorageNode`` writes it;
* a centre and size in RAS millimetres (``"R,A,S:W,H,D"`` on the command line);
* the bounding box of a mask or segmentation volume (``.nii.gz``, ``.seg.nrrd``) plus a margin in mm.

SimpleITK works in LPS; :meth:`ROI.center_lps` and :meth:`ROI.axes_lps` convert.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ipmn.errors import IPMNError
from ipmn.vocab import looks_like_box

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ROI:
    center: np.ndarray  # (3,) RAS mm
    size: np.ndarray  # (3,) mm along the ROI's own axes
    axes: np.ndarray  # (3, 3) columns: the ROI's unit axes in RAS

    def __post_init__(self):
        center = np.asarray(self.center, dtype=float).reshape(3)
        size = np.asarray(self.size, dtype=float).reshape(3)
        axes = np.asarray(self.axes, dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(center)) or not np.all(np.isfinite(size)) or not np.all(np.isfinite(axes)):
            raise IPMNError("ROI: centre, size and orientation must be finite numbers")
        if np.any(size <= 0):
            raise IPMNError(f"ROI: every side must be larger than 0 mm (size {size.round(2).tolist()})")
        # Orthonormalise (files are written with rounding) and refuse degenerate matrices.
        u, s, vt = np.linalg.svd(axes)
        if s.min() < 1e-3:
            raise IPMNError("ROI: the orientation matrix is degenerate")
        axes = u @ vt
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "axes", axes)

    @property
    def center_lps(self) -> np.ndarray:
        return RAS_TO_LPS @ self.center

    @property
    def axes_lps(self) -> np.ndarray:
        return RAS_TO_LPS @ self.axes

    def corners(self, margin_mm: float = 0.0) -> np.ndarray:
        """The 8 corners in RAS, optionally grown by a margin on every side."""
        half = self.size / 2.0 + margin_mm
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        return self.center + (signs * half) @ self.axes.T

    def grown(self, margin_mm: float) -> ROI:
        return ROI(self.center, self.size + 2 * margin_mm, self.axes)

    def to_dict(self) -> dict:
        return {
            "center_ras": [round(float(v), 4) for v in self.center],
            "size_mm": [round(float(v), 4) for v in self.size],
            "axes_ras": [[round(float(v), 8) for v in row] for row in self.axes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ROI:
        return cls(d["center_ras"], d["size_mm"], d.get("axes_ras", np.eye(3)))


def roi_from_center_size(center_ras, size_mm, axes_ras=None) -> ROI:
    return ROI(center_ras, size_mm, np.eye(3) if axes_ras is None else axes_ras)


def parse_center_size(text: str) -> ROI:
    """Parse ``"R,A,S:W,H,D"`` (RAS mm) into an axis-aligned ROI."""
    try:
        c, s = text.split(":")
        center = [float(v) for v in c.split(",")]
        size = [float(v) for v in s.split(",")]
        if len(center) != 3 or len(size) != 3:
            raise ValueError
    except ValueError as exc:
        raise IPMNError(f"ROI: cannot parse {text!r}; expected 'R,A,S:W,H,D' in millimetres (RAS)") from exc
    return roi_from_center_size(center, size)


def read_mrk_json(path: str | os.PathLike, name: str | None = None) -> ROI:
    """Read a Slicer markups ROI (``.mrk.json``); ``name`` picks one of several ROIs in the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IPMNError(f"ROI: file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IPMNError(f"ROI: {path} is not a readable markups JSON file ({exc.__class__.__name__})") from exc
    markups = doc.get("markups") if isinstance(doc, dict) else None
    rois = [m for m in (markups or []) if isinstance(m, dict) and m.get("type") == "ROI"]
    if not rois:
        raise IPMNError(f"ROI: {path} holds no markups ROI (a Slicer 'ROI' markup saved as .mrk.json is needed)")
    m = _pick_roi(rois, name, path)
    try:
        center = np.array(m["center"], dtype=float)
        size = np.array(m["size"], dtype=float)
        orientation = np.array(m.get("orientation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    except (KeyError, ValueError, TypeError) as exc:
        raise IPMNError(f"ROI: {path} has no valid 'center', 'size' and 'orientation'") from exc
    system = str(m.get("coordinateSystem", "LPS")).upper()
    if system == "LPS":
        center = RAS_TO_LPS @ center
        orientation = RAS_TO_LPS @ orientation
    elif system != "RAS":
        raise IPMNError(f"ROI: {path} uses coordinateSystem {system!r}; LPS or RAS is supported")
    return ROI(center, size, orientation)


def _pick_roi(rois: list[dict], name: str | None, path) -> dict:
    names = [str(m.get("name") or f"ROI {i + 1}") for i, m in enumerate(rois)]
    if name:
        found = [m for m, n in zip(rois, names, strict=True) if n.strip().lower() == str(name).strip().lower()]
        if len(found) != 1:
            what = "no ROI" if not found else f"{len(found)} ROIs"
            raise IPMNError(f"ROI: {path} has {what} named {name!r}; its ROIs: {', '.join(map(repr, names))}")
        return found[0]
    if len(rois) > 1:
        raise IPMNError(
            f"ROI: {path} holds {len(rois)} ROIs ({', '.join(map(repr, names))}); choose one with --mask-segment NAME "
            "(cohort column mask_segment)"
        )
    return rois[0]


def write_mrk_json(roi: ROI, path: str | os.PathLike, name: str = "Pancreas ROI") -> Path:
    """Write the ROI as Slicer does: LPS coordinates, orientation as a row-major 3x3 matrix."""
    from ipmn.io import write_json

    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        "Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "ROI",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": 1,
                "roiType": "Box",
                "name": name,
                "center": [float(v) for v in roi.center_lps],
                "orientation": [float(v) for v in roi.axes_lps.ravel()],
                "size": [float(v) for v in roi.size],
                "insideOut": False,
                # Slicer ignores the size of an ROI that has no control point: one at the centre.
                "controlPoints": [
                    {
                        "id": "1",
                        "label": f"{name}-1",
                        "position": [float(v) for v in roi.center_lps],
                        "orientation": [float(v) for v in roi.axes_lps.ravel()],
                        "positionStatus": "defined",
                    }
                ],
                "measurements": [],
            }
        ],
    }
    return write_json(doc, path)


def roi_from_mask(mask: sitk.Image, margin_mm: float = 10.0, label: int | None = None, name: str = "mask") -> ROI:
    """Bounding box (in the mask's voxel axes) of the non-zero voxels, or of ``label``, plus a margin."""
    array = sitk.GetArrayViewFromImage(mask)
    if array.ndim == 4:  # 4-D image (t, z, y, x): any volume
        array = array.any(axis=0)
    sel = array == label if label is not None else array != 0
    if not sel.any():
        what = f"label {label}" if label is not None else "non-zero voxels"
        raise IPMNError(f"ROI: {name} has no {what}")
    zyx = np.nonzero(sel)
    lo = np.array([zyx[2].min(), zyx[1].min(), zyx[0].min()], dtype=float) - 0.5
    hi = np.array([zyx[2].max(), zyx[1].max(), zyx[0].max()], dtype=float) + 0.5
    spacing = np.array(mask.GetSpacing()[:3])
    direction = np.array(mask.GetDirection()).reshape(mask.GetDimension(), mask.GetDimension())[:3, :3]
    origin = np.array(mask.GetOrigin()[:3])
    center_idx = (lo + hi) / 2.0
    center_lps = origin + direction @ (center_idx * spacing)
    size = (hi - lo) * spacing + 2.0 * margin_mm
    axes_ras = RAS_TO_LPS @ direction
    return ROI(RAS_TO_LPS @ center_lps, size, axes_ras)


def load_roi(
    spec: str | os.PathLike, margin_mm: float = 10.0, label: int | None = None, segment: str | None = None
) -> ROI:
    """Build an ROI from a ``.mrk.json`` file, a mask/segmentation volume, or ``"R,A,S:W,H,D"``.

    ``segment`` chooses one ROI of a .mrk.json or one segment of a .seg.nrrd (name or terminology), or
    is a label value of a plain label map.
    """
    text = str(spec)
    if looks_like_box(text):
        if segment:
            raise IPMNError(f"ROI: --mask-segment {segment!r} needs a .seg.nrrd, .mrk.json or label map, not a box")
        return parse_center_size(text)
    path = Path(text)
    if text.lower().endswith(".json"):
        return read_mrk_json(path, segment)
    if not path.exists():
        raise IPMNError(f"ROI: file not found: {path}")
    from ipmn.io import nifti_nonfinite
    from ipmn.segments import is_segmentation_file, segment_image

    nifti_nonfinite(path, "ROI mask")  # a truncated mask would be read as zeros: a wrong box
    if is_segmentation_file(path):
        return roi_from_mask(segment_image(path, segment), margin_mm=margin_mm, name=f"{path} segment")
    if segment:
        if not str(segment).strip().isdigit():
            raise IPMNError(f"ROI: {path} has no named segments; --mask-segment takes a label value for it")
        label = int(segment)
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise IPMNError(f"ROI: cannot read {path} as a .mrk.json ROI or a mask volume") from exc
    if mask.GetDimension() not in (3, 4):
        raise IPMNError(f"ROI: mask {path} is {mask.GetDimension()}-D; a 3-D mask is needed")
    if mask.GetDimension() == 4:
        # .seg.nrrd with several layers comes as a 4-D or vector image; collapse the layers.
        mask = sitk.Cast(mask[:, :, :, 0], sitk.sitkUInt8) if mask.GetSize()[3] == 1 else mask
    if mask.GetNumberOfComponentsPerPixel() > 1 and not path.name.lower().endswith(".seg.nrrd"):
        raise IPMNError(f"ROI: mask {path} has {mask.GetNumberOfComponentsPerPixel()} components per voxel "
                        "(a colour image?); a label volume or a Slicer .seg.nrrd is needed")
    if mask.GetNumberOfComponentsPerPixel() > 1:
        comps = [sitk.VectorIndexSelectionCast(mask, i) != 0 for i in range(mask.GetNumberOfComponentsPerPixel())]
        merged = comps[0]
        for c in comps[1:]:
            merged = merged | c
        mask = merged
    return roi_from_mask(mask, margin_mm=margin_mm, label=label, name=str(path))
