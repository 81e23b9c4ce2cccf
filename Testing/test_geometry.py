"""Geometry: markers at known RAS points land in the expected grid pixel for any input orientation, T2 with
another geometry lands on the same anatomy, and the grid ⇄ volume mapping is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from ipmn.config import PreprocessConfig
from ipmn.errors import IPMNError
from ipmn.grid import (
    case_windows,
    make_roi_grid,
    pixel_source,
    resample_to_grid,
    roi_to_reference,
    tile,
    untile,
    window_to_roi,
)
from ipmn.preprocess import prepare_case
from ipmn.roi import RAS_TO_LPS, ROI

RAW = PreprocessConfig(n4=False, smoothing="none", antialias=False, standardize="none", scale01=False)


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


ORIENTATIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "flipped-z": np.diag([1.0, -1.0, -1.0]),
    "permuted": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "oblique": _rotation([1, 2, 0.5], 17) @ np.diag([-1.0, 1.0, 1.0]),
}


def _volume_with_markers(direction_lps, markers_ras, spacing=(1.0, 1.0, 2.0), size=(120, 120, 60)):
    """Zeros with a small bright blob (Gaussian, sigma 1.5 mm) at each RAS marker."""
    direction = np.asarray(direction_lps, float)
    spacing = np.asarray(spacing, float)
    size = np.asarray(size)
    origin = -direction @ ((size - 1) / 2 * spacing)  # volume centred on (0,0,0)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    idx = np.stack([ii, jj, kk], -1) * spacing
    lps = idx @ direction.T + origin
    arr = np.zeros(size[::-1], np.float32)
    for m in markers_ras:
        p = RAS_TO_LPS @ np.asarray(m, float)
        d2 = ((lps - p) ** 2).sum(-1)
        arr += np.exp(-d2 / (2 * 1.5**2)).astype(np.float32)
    img = sitk.GetImageFromArray(arr + 0.01)
    img.SetOrigin(origin.tolist())
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    return img


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_marker_lands_in_expected_cell_and_pixel(orientation):
    roi = ROI(center=[5.0, -3.0, 2.0], size=[64.0, 64.0, 40.0], axes=np.eye(3))
    # Marker 16 mm to the patient's LEFT, 16 mm ANTERIOR of the ROI centre, near its superior end.
    marker = np.array([5.0 - 16.0, -3.0 + 16.0, 2.0 + 14.0])
    image = _volume_with_markers(ORIENTATIONS[orientation], [marker])
    volumes = {"t1": image, "t2": image}
    case = prepare_case(volumes, roi, RAW, ("t1",))
    data = case.data[0]  # (slices, rows, cols)
    s, r, c = np.unravel_index(np.argmax(data), data.shape)
    # Semantics: columns run to patient left (left half of ROI -> right half of the image), rows run
    # posterior (anterior -> top), slices inferior -> superior.
    assert c > 32 + 8 and r < 32 - 8, (r, c)
    assert s > case.n_slices / 2
    # Exact position: 1 mm pixels, column 32 + 16 - 0.5 = 47.5 +- 1 pixel.
    assert abs(c - 47.5) <= 1.0 and abs(r - 15.5) <= 1.0
    expected = case.grid.reference_image().TransformPhysicalPointToContinuousIndex((RAS_TO_LPS @ marker).tolist())
    assert abs(s - expected[2]) <= 1.0
    # ...and in the tiled image it sits in the cell of that slice, at that pixel.
    k = 9
    if case.n_slices >= k:
        starts, windows = case_windows(case.data, k, "all")
        start = [st for st in starts if st <= s < st + k][0]
        tiled = windows[starts.index(start), 0]
        src_slice, src_row, src_col = pixel_source(k, 64, start)
        R, C = np.unravel_index(np.argmax(tiled), tiled.shape)
        assert (src_slice[R, C], src_row[R, C], src_col[R, C]) == (s, r, c)


def test_oblique_roi_axes_follow_the_roi():
    rot = _rotation([0, 0, 1], 25)
    roi = ROI(center=[0, 0, 0], size=[60, 60, 40], axes=rot)
    marker_roi_frame = np.array([-15.0, 10.0, 0.0])  # along the ROI's own axes (RAS columns)
    marker = rot @ marker_roi_frame
    image = _volume_with_markers(np.eye(3), [marker], spacing=(1, 1, 1), size=(100, 100, 50))
    grid = make_roi_grid(roi, image, cell=60)
    arr = sitk.GetArrayFromImage(resample_to_grid(image, grid))
    s, r, c = np.unravel_index(np.argmax(arr), arr.shape)
    # ROI axis x (towards R) is mapped to columns towards L: -15 mm in x -> +15 px from the centre.
    assert abs(c - (29.5 + 15)) <= 1 and abs(r - (29.5 - 10)) <= 1


def _render_same_contrast(case_seed=5):
    """Two acquisitions of one phantom anatomy with the same contrast and different geometries."""
    from ipmn.phantoms import _anatomy, _make_geometry, _render

    rng = np.random.default_rng(case_seed)
    anat, _ = _anatomy(rng, 1)
    g1 = _make_geometry(rng, (192, 192), 40, 320, 3.0, "LPS", 0.0, np.zeros(3))
    g2 = _make_geometry(rng, (256, 256), 30, 340, 4.0, "PLS", 9.0, np.array([4.0, -6.0, 3.0]))

    def image(geom, shift):
        arr, _, _ = _render(anat, geom, np.asarray(shift, np.float32), 0, h=float(np.mean(geom[1])))
        img = sitk.GetImageFromArray(arr)
        img.SetOrigin(geom[0].tolist())
        img.SetSpacing(geom[1].tolist())
        img.SetDirection(geom[2].ravel().tolist())
        return img

    return anat, image(g1, [0, 0, 0]), image(g2, [0, 0, 0]), image(g2, [8, 0, 0])


def test_t2_with_other_geometry_lands_on_same_anatomy():
    from ipmn.phantoms import _roi_for

    anat, a, b, b_shifted = _render_same_contrast()
    roi = _roi_for(anat, np.random.default_rng(0))
    cfg = PreprocessConfig(n4=False, smoothing="none", standardize="none", scale01=False)
    same = prepare_case({"t1": a, "t2": b}, roi, cfg).data
    moved = prepare_case({"t1": a, "t2": b_shifted}, roi, cfg).data
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))
    r_same = np.corrcoef(same[0][inner].ravel(), same[1][inner].ravel())[0, 1]
    r_moved = np.corrcoef(moved[0][inner].ravel(), moved[1][inner].ravel())[0, 1]
    assert r_same > 0.9, r_same
    assert r_moved < r_same - 0.05, (r_same, r_moved)


def test_tile_untile_roundtrip_and_order():
    stack = np.arange(2 * 9 * 4 * 4, dtype=np.float32).reshape(2, 9, 4, 4)
    tiled = tile(stack)
    assert tiled.shape == (2, 12, 12)
    np.testing.assert_array_equal(untile(tiled, 9), stack)
    # top-left cell is slice 0, top-right slice 2, bottom-left slice 6
    np.testing.assert_array_equal(tiled[0, :4, :4], stack[0, 0])
    np.testing.assert_array_equal(tiled[0, :4, 8:], stack[0, 2])
    np.testing.assert_array_equal(tiled[0, 8:, :4], stack[0, 6])


def test_windows_back_to_roi_average_overlaps():
    n, k = 12, 9
    maps = []
    starts = [0, 1, 2, 3]
    for st in starts:
        cells = np.stack([np.full((8, 8), st + j, np.float32) for j in range(k)])  # value = slice index
        maps.append(tile(cells))
    roi_map = window_to_roi(maps, starts, n, k)
    # every window wrote the true slice index, so the average is exact
    np.testing.assert_allclose(roi_map[:, 0, 0], np.arange(n))


def test_grid_to_volume_roundtrip_is_exact():
    """A map written on the ROI grid and resampled into T1's geometry reads back voxel-exactly."""
    spacing = (1.5, 1.5, 3.0)
    image = _volume_with_markers(np.diag([-1.0, 1.0, 1.0]), [[0, 0, 0]], spacing=spacing, size=(90, 90, 30))
    # ROI exactly 64 voxels wide and aligned to voxel centres of the volume
    vox_center = np.array(image.TransformIndexToPhysicalPoint((45, 45, 15)))
    center_ras = RAS_TO_LPS @ (vox_center + np.array([0.75, 0.75, 0.0]) * np.array([-1, 1, 1]))
    roi = ROI(center=center_ras, size=[96.0, 96.0, 33.0], axes=np.eye(3))
    grid = make_roi_grid(roi, image, cell=64)
    assert grid.spacing == pytest.approx(spacing)
    rng = np.random.default_rng(0)
    values = rng.random((grid.n_slices, 64, 64)).astype(np.float32) + 1
    on_grid = grid.image_from_array(values)
    in_t1 = roi_to_reference(on_grid, image, sitk.sitkNearestNeighbor)
    assert in_t1.GetSize() == image.GetSize() and in_t1.GetOrigin() == image.GetOrigin()
    back = sitk.GetArrayFromImage(resample_to_grid(in_t1, grid, sitk.sitkNearestNeighbor))
    np.testing.assert_array_equal(back, values)
    # outside the ROI the map is 0
    assert sitk.GetArrayViewFromImage(in_t1)[:, :, 0].max() == 0


def _marker_pair_columns(roi_size_x, grid_spacing_mm):
    """Column distance on the grid between two markers 30 mm apart along patient left-right."""
    roi = ROI(center=[0.0, 0.0, 0.0], size=[roi_size_x, 60.0, 40.0], axes=np.eye(3))
    markers = [[-15.0, 0.0, 0.0], [15.0, 0.0, 0.0]]
    image = _volume_with_markers(ORIENTATIONS["LPS"], markers, spacing=(1.0, 1.0, 2.0), size=(200, 120, 40))
    cfg = PreprocessConfig.from_dict({**RAW.to_dict(), "grid_spacing_mm": grid_spacing_mm})
    case = prepare_case({"t1": image}, roi, cfg, ("t1",))
    profile = case.data[0].max(axis=(0, 1))  # over slices and rows
    left, right = profile[:32], profile[32:]
    return (32 + int(np.argmax(right))) - int(np.argmax(left)), case.grid


@pytest.mark.parametrize("roi_size_x", [100.0, 160.0])
def test_fixed_grid_spacing_keeps_physical_sizes_in_pixels(roi_size_x):
    # Two markers 30 mm apart: with 2 mm pixels they are 15 columns apart whatever the ROI's size...
    cols, grid = _marker_pair_columns(roi_size_x, [2.0, 1.0])
    assert grid.spacing[:2] == (2.0, 1.0)
    assert abs(cols - 15) <= 1
    field = grid.field_roi()
    assert np.allclose(field.center, [0.0, 0.0, 0.0], atol=1.01)  # centred on the ROI (slices snap)
    assert np.allclose(field.size[:2], [128.0, 64.0])


def test_roi_scaled_grid_changes_physical_sizes_in_pixels():
    # ...while the default (ROI / cell) puts them 30 * 64 / size columns apart: the ablation of the option.
    small, _ = _marker_pair_columns(100.0, None)
    large, _ = _marker_pair_columns(160.0, None)
    assert abs(small - 30 * 64 / 100) <= 1 and abs(large - 30 * 64 / 160) <= 1


@pytest.mark.parametrize("bad", [0, -1.0, [2.0], [2.0, 0.0], "2", 50.0])
def test_grid_spacing_refuses_bad_values(bad):
    with pytest.raises(IPMNError, match="grid_spacing_mm"):
        PreprocessConfig.from_dict({"grid_spacing_mm": bad})


def test_grid_spacing_absent_from_configs_that_do_not_set_it():
    # Fingerprints and cache keys of configs written before the option existed stay the same.
    assert "grid_spacing_mm" not in PreprocessConfig().to_dict()
    assert PreprocessConfig.from_dict({"grid_spacing_mm": 2.4}).to_dict()["grid_spacing_mm"] == 2.4
    assert PreprocessConfig.from_dict({"grid_spacing_mm": 2.4}).pixel_mm == (2.4, 2.4)
