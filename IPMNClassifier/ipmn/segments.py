"""One segment of a Slicer segmentation (``.seg.nrrd``), chosen by name or terminology.

TotalSegmentator and Slicer write many segments (pancreas, liver, vessels ...) into one file; the box
around all of them is not the pancreas ROI. A file with several segments therefore needs a choice
(``--mask-segment NAME``, cohort column ``mask_segment``): a segment name (case-insensitive), a
terminology type or region meaning (``Pancreas``) or code (``SCT^15776009``). Without a choice the error
lists the segments. Reading uses slicerio, which understands layers and terminology entries.

:func:`pick_segment` is also the rule of Slicer's *ROI from segmentation* (``IPMNClassifierLib.roitools``), so
this module stays light at import (numpy, SimpleITK and slicerio only inside :func:`segment_image`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ipmn.errors import IPMNError

if TYPE_CHECKING:
    import SimpleITK as sitk


def is_segmentation_file(path: str | os.PathLike) -> bool:
    """True for a .seg.nrrd (or any NRRD) that carries Slicer segment metadata."""
    if not str(path).lower().endswith((".nrrd", ".nhdr")):
        return False
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception:  # noqa: BLE001 - not a segmentation: read as a plain mask volume instead
        return False
    return bool(seg.get("segments"))


def _codes(segment: dict) -> list[str]:
    """Terminology meanings and codes of a segment (type, type modifier, region), lower-case."""
    term = segment.get("terminology") or {}
    out = []
    for key in ("type", "typeModifier", "anatomicRegion"):
        code = term.get(key)
        if code and len(code) >= 3:
            out += [str(code[2]).lower(), f"{code[0]}^{code[1]}".lower()]
    return out


def _label(segment: dict) -> str:
    term = segment.get("terminology") or {}
    meaning = (term.get("type") or [None, None, None])[2]
    name = segment.get("name") or segment.get("id")
    return f"'{name}'" + (f" ({meaning})" if meaning and str(meaning).lower() != str(name).lower() else "")


def pick_segment(segments: list[dict], choice: str | None, where: str) -> dict:
    """The segment named (or coded) ``choice``; the only segment when ``choice`` is empty."""
    listing = ", ".join(_label(s) for s in segments)
    if not choice:
        if len(segments) == 1:
            return segments[0]
        raise IPMNError(
            f"ROI: {where} holds {len(segments)} segments ({listing}); choose one with --mask-segment NAME "
            "(cohort column mask_segment)"
        )
    wanted = str(choice).strip().lower()
    by_name = [s for s in segments if str(s.get("name", "")).strip().lower() == wanted]
    found = by_name or [s for s in segments if wanted in _codes(s)]
    if not found:
        raise IPMNError(f"ROI: {where} has no segment named or coded {choice!r}; its segments: {listing}")
    if len(found) > 1:
        raise IPMNError(f"ROI: {where} has {len(found)} segments matching {choice!r} ({', '.join(map(_label, found))})")
    return found[0]


def segment_image(path: str | os.PathLike, choice: str | None = None) -> sitk.Image:
    """A binary uint8 mask (physical geometry of the file) of one segment of a Slicer segmentation."""
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    path = Path(path)
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise IPMNError(f"ROI: cannot read {path} as a Slicer segmentation: {type(exc).__name__}") from exc
    segment = pick_segment(list(seg.get("segments") or []), choice, str(path))
    mask = slicerio.segment_mask(seg, segment)  # (i, j, k)
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image
