"""The ROI grid: where the model's pixels are in the patient, and the way back.

``make_roi_grid`` builds a sampling grid inside the ROI: ``cell`` × ``cell`` pixels in-plane across the
ROI and slices along the ROI's superior–inferior axis at the reference modality's slice spacing. The
grid's axes are the ROI's axes, permuted and flipped so that columns run towards patient Left, rows
towards Posterior and slices towards Superior: an axial slice of the grid is shown in the radiological
convention (patient right on the left of the screen, anterior at the top), slice 0 is the most inferior.

Both modalities are resampled onto the same grid through physical space. ``tile`` arranges k
consecutive slices into a √k × √k image (top-left to bottom-right); ``untile``/``window_to_roi`` and
``roi_to_reference`` take a map on that image back to the ROI grid and then into any volume's geometry.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ipmn.errors import IPMNError
from ipmn.roi import RAS_TO_LPS, ROI
from ipmn.vocab import is_perfect_square

# Grid axes in RAS: columns → Left, rows → Posterior, slices → Superior.
_TARGETS_RAS = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class RoiGrid:
    """Geometry of the sampling grid (SimpleITK/LPS convention): size is (columns, rows, slices)."""

    origin: tuple
    spacing: tuple
    direction: tuple
    size: tuple

    @property
    def n_slices(self) -> int:
        return int(self.size[2])

    def reference_image(self, pixel_type=sitk.sitkFloat32) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], pixel_type)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """A (slices, rows, columns) array as an image on this grid."""
        expected = (self.size[2], self.size[1], self.size[0])
        if tuple(array.shape) != tuple(expected):
            raise ValueError(f"array shape {array.shape} does not match the grid {expected}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def field_roi(self) -> ROI:
        """The box the grid samples (pixel centres ± half a pixel) as an :class:`ROI`."""
        direction = np.array(self.direction).reshape(3, 3)
        spacing, size = np.array(self.spacing), np.array(self.size)
        center_lps = np.array(self.origin) + direction @ ((size - 1) / 2.0 * spacing)
        return ROI(RAS_TO_LPS @ center_lps, size * spacing, RAS_TO_LPS @ direction)

    def to_dict(self) -> dict:
        return {
            "origin_lps": [float(v) for v in self.origin],
            "spacing": [float(v) for v in self.spacing],
            "direction_lps": [float(v) for v in self.direction],
            "size": [int(v) for v in self.size],
        }

    @classmethod
    def from_dict(cls, d: dict) -> RoiGrid:
        return cls(tuple(d["origin_lps"]), tuple(d["spacing"]), tuple(d["direction_lps"]), tuple(d["size"]))


def _grid_axes_ras(roi: ROI) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the ROI axes to point towards L, P, S. Returns (axes as columns, matching ROI sizes)."""
    dots = _TARGETS_RAS @ roi.axes  # [target, roi_axis]
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(dots[t, a]) for t, a in enumerate(p)))
    axes = np.zeros((3, 3))
    sizes = np.zeros(3)
    for t, a in enumerate(best):
        sign = 1.0 if dots[t, a] >= 0 else -1.0
        axes[:, t] = sign * roi.axes[:, a]
        sizes[t] = roi.size[a]
    return axes, sizes


def slice_spacing_along(image: sitk.Image, direction_lps: np.ndarray) -> tuple[float, int]:
    """Spacing of ``image`` along its voxel axis closest to ``direction_lps``, and that axis."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d.T @ direction_lps)))
    return float(image.GetSpacing()[axis]), axis


def make_roi_grid(
    roi: ROI,
    reference: sitk.Image,
    cell: int = 64,
    slice_spacing: float | None = None,
    snap_to_slices: bool = True,
    pixel_mm: tuple[float, float] | None = None,
) -> RoiGrid:
    """The sampling grid for ``roi``: ``cell`` × ``cell`` across the ROI, slices at the reference spacing.

    With ``pixel_mm`` = (along patient left, along posterior) the in-plane pixels have that fixed physical
    size instead, centred on the ROI: a 10 mm duct is then the same number of pixels in every case, and the
    field (``cell`` × pixel) may cut a large ROI's margins or show tissue around a small one.

    When the ROI's S axis is parallel to one of the reference's voxel axes and ``snap_to_slices`` is set,
    grid slices are placed exactly on the reference's slices, so thick slices are never interpolated.
    """
    axes_ras, sizes = _grid_axes_ras(roi)
    axes_lps = RAS_TO_LPS @ axes_ras
    z_lps = axes_lps[:, 2]
    ref_spacing, ref_axis = slice_spacing_along(reference, z_lps)
    dz = float(slice_spacing) if slice_spacing else ref_spacing
    n_slices = max(1, int(math.floor(sizes[2] / dz + 1e-6)))
    if pixel_mm is None:
        spacing = np.array([sizes[0] / cell, sizes[1] / cell, dz])
    else:
        spacing = np.array([float(pixel_mm[0]), float(pixel_mm[1]), dz])
    size = np.array([cell, cell, n_slices])
    center = roi.center_lps.copy()

    ref_dir = np.array(reference.GetDirection()).reshape(3, 3)
    parallel = abs(abs(float(ref_dir[:, ref_axis] @ z_lps)) - 1.0) < 1e-4
    if snap_to_slices and parallel and math.isclose(dz, ref_spacing, rel_tol=1e-6):
        cont = reference.TransformPhysicalPointToContinuousIndex([float(v) for v in center])[ref_axis]
        first = cont - (n_slices - 1) / 2.0 * np.sign(ref_dir[:, ref_axis] @ z_lps)
        shift = (round(first) - first) * np.sign(ref_dir[:, ref_axis] @ z_lps)
        center = center + z_lps * shift * dz

    origin = center - axes_lps @ ((size - 1) / 2.0 * spacing)
    return RoiGrid(
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=tuple(float(v) for v in axes_lps.ravel()),
        size=tuple(int(v) for v in size),
    )


def crop_to_roi(image: sitk.Image, roi: ROI, margin_mm: float, name: str = "volume") -> sitk.Image:
    """The part of ``image`` (in its own voxel grid) that covers the ROI plus a margin.

    Raises if the ROI does not intersect the image at all.
    """
    corners_lps = (RAS_TO_LPS @ roi.corners(margin_mm).T).T
    idx = np.array([image.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in corners_lps])
    size = np.array(image.GetSize())
    lo = np.floor(idx.min(axis=0)).astype(int)
    hi = np.ceil(idx.max(axis=0)).astype(int)
    # Intersection test on the ROI itself (without margin).
    inner = np.array(
        [
            image.TransformPhysicalPointToContinuousIndex([float(v) for v in p])
            for p in (RAS_TO_LPS @ roi.corners(0.0).T).T
        ]
    )
    if np.any(inner.max(axis=0) < -0.5) or np.any(inner.min(axis=0) > size - 0.5):
        raise IPMNError(
            f"ROI (centre RAS {np.round(roi.center, 1).tolist()}, size {np.round(roi.size, 1).tolist()} mm) "
            f"does not intersect the {name} volume"
        )
    lo = np.clip(lo, 0, size - 1)
    hi = np.clip(hi, 0, size - 1)
    extent = hi - lo + 1
    return sitk.RegionOfInterest(image, [int(v) for v in extent], [int(v) for v in lo])


def resample_to_grid(image: sitk.Image, grid: RoiGrid, interpolator=sitk.sitkLinear, default=0.0) -> sitk.Image:
    return sitk.Resample(image, grid.reference_image(), sitk.Transform(), interpolator, default, sitk.sitkFloat32)


def coverage(image: sitk.Image, grid: RoiGrid) -> float:
    """Fraction of grid voxels that fall inside ``image``."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside = sitk.Resample(ones, grid.reference_image(sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return float(sitk.GetArrayViewFromImage(inside).mean())


# ---------------------------------------------------------------------------------------------- windows
def grid_side(k: int) -> int:
    """√k, the number of cells along each side of the grid; k must be a perfect square."""
    if not is_perfect_square(k):
        raise IPMNError(f"k must be a perfect square (1, 4, 9, 16, ...); got {k}")
    return math.isqrt(k)


def window_starts(n_slices: int, k: int, stride: int = 1) -> list[int]:
    """First slice of every window of ``k`` consecutive slices (sliding, ``stride`` apart)."""
    if n_slices < k:
        return []
    starts = list(range(0, n_slices - k + 1, max(1, int(stride))))
    return starts


def central_start(n_slices: int, k: int) -> int:
    return max(0, (n_slices - k) // 2)


def check_slices(n_slices: int, k: int, pad: bool = False) -> None:
    if n_slices < k and not pad:
        raise IPMNError(
            f"the ROI covers {n_slices} slice(s) of the reference volume but k={k} consecutive slices are "
            f"needed; enlarge the ROI along superior-inferior, lower k, or allow replicate padding (--pad)"
        )


def pad_slices(stack: np.ndarray, k: int) -> np.ndarray:
    """Replicate the last slice until ``stack`` (…, slices, H, W) has ``k`` slices (reference code's rule)."""
    n = stack.shape[-3]
    if n >= k:
        return stack
    reps = np.repeat(stack[..., -1:, :, :], k - n, axis=-3)
    return np.concatenate([stack, reps], axis=-3)


def tile(stack: np.ndarray) -> np.ndarray:
    """(…, k, H, W) → (…, √k·H, √k·W), slices placed row by row from the top-left."""
    k, h, w = stack.shape[-3:]
    m = grid_side(k)
    lead = stack.shape[:-3]
    x = stack.reshape(*lead, m, m, h, w)
    x = np.moveaxis(x, -2, -3)  # (…, m_row, h, m_col, w)
    return x.reshape(*lead, m * h, m * w)


def untile(image: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`tile`: (…, √k·H, √k·W) → (…, k, H, W)."""
    m = grid_side(k)
    hh, ww = image.shape[-2:]
    h, w = hh // m, ww // m
    lead = image.shape[:-2]
    x = image.reshape(*lead, m, h, m, w)
    x = np.moveaxis(x, -3, -2)  # (…, m_row, m_col, h, w)
    return x.reshape(*lead, k, h, w)


def pixel_source(k: int, cell: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pixel of the tiled image: (ROI slice, row, column) it came from."""
    m = grid_side(k)
    rr, cc = np.mgrid[0 : m * cell, 0 : m * cell]
    cell_index = (rr // cell) * m + cc // cell
    return start + cell_index, rr % cell, cc % cell


def window_to_roi(maps: list[np.ndarray], starts: list[int], n_slices: int, k: int) -> np.ndarray:
    """Place tiled maps (one per window) back on the ROI grid, averaging where windows overlap.

    Slices no window covers are 0. Returns (n_slices, cell, cell) float32.
    """
    if not maps:
        raise ValueError("no maps")
    cells = [untile(np.asarray(mp, dtype=np.float64), k) for mp in maps]
    h, w = cells[0].shape[-2:]
    acc = np.zeros((n_slices, h, w))
    count = np.zeros(n_slices)
    for start, c in zip(starts, cells, strict=True):
        n = min(k, n_slices - start)
        acc[start : start + n] += c[:n]
        count[start : start + n] += 1
    covered = count > 0
    acc[covered] /= count[covered, None, None]
    return acc.astype(np.float32)


def roi_to_reference(roi_image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resample a map on the ROI grid into ``reference``'s geometry (0 outside the ROI)."""
    return sitk.Resample(roi_image, reference, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def case_windows(data: np.ndarray, k: int, mode: str = "central", stride: int = 1, pad: bool = False):
    """Tiled windows of a (channels, slices, H, W) array.

    Returns (starts, array of shape (n_windows, channels, √k·H, √k·W)). ``mode`` is ``"central"`` (the
    paper's inference input) or ``"all"`` (every window, ``stride`` apart).
    """
    grid_side(k)
    n = data.shape[1]
    check_slices(n, k, pad)
    if n < k:
        data = pad_slices(data, k)
        n = k
    if mode == "central":
        starts = [central_start(n, k)]
    elif mode == "all":
        starts = window_starts(n, k, stride)
    else:
        raise IPMNError(f"windows must be 'central' or 'all' (got {mode!r})")
    return starts, np.stack([tile(data[:, s : s + k]) for s in starts]).astype(np.float32)
