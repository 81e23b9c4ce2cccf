"""The attention overlay as Slicer composes it (``vtkMRMLSliceLogic`` from slicer-core, no Qt/OpenGL).

A phantom with one bright lesion at a known world position, stored in LPS (NIfTI) and in RAS (NRRD with
``space: right-anterior-superior``), goes through the module's logic with a stand-in engine whose map is
the ROI-masked inverted T1 intensity (high on the dark lesion, zero outside the ROI, computed by the engine
in its own voxel grid); the composed slice must show the overlay on the lesion and nothing outside the ROI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_slicer import CLASSIFIER_DIR, FAKE_ENGINE, fake_launcher, fake_package, make_scene

slicer = pytest.importorskip("slicer")

from IPMNClassifierLib.logic import ClassifierLogic, PredictOptions  # noqa: E402
from IPMNClassifierLib.slicecompose import SliceComposer, resultLayers  # noqa: E402

SHAPE = (24, 64, 64)  # (k, j, i)
SPACING = (2.0, 2.0, 3.0)  # i, j, k in mm
LESION_IJK = (40, 24, 12)
LESION_RADIUS_MM = 7.0
HEAT_FROM_INTENSITY = (
    "arr = sitk.GetArrayFromImage(image).astype(np.float32)\n"
    "    lo, hi = arr[inside].min(), arr[inside].max()\n"
    "    heat = np.where(inside, (hi - arr) / ((hi - lo) or 1.0), 0.0).astype(np.float32)"
)


def _phantom() -> np.ndarray:
    rng = np.random.default_rng(5)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    dist = np.sqrt(((i - LESION_IJK[0]) * SPACING[0]) ** 2 + ((j - LESION_IJK[1]) * SPACING[1]) ** 2
                   + ((k - LESION_IJK[2]) * SPACING[2]) ** 2)
    # a cyst: dark on T1 in brighter parenchyma
    return np.where(dist <= LESION_RADIUS_MM, 20.0, 400.0 + 40.0 * rng.random(SHAPE)).astype(np.float32)


def _write_lps_nifti(path: Path, origin_lps) -> np.ndarray:
    """Identity LPS directions: world RAS of voxel (i, j, k) = (-(ox + i dx), -(oy + j dy), oz + k dz)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(_phantom())
    image.SetSpacing(SPACING)
    image.SetOrigin(origin_lps)
    sitk.WriteImage(image, str(path))
    o = np.array(origin_lps)
    return np.array([-(o[0] + LESION_IJK[0] * SPACING[0]), -(o[1] + LESION_IJK[1] * SPACING[1]),
                     o[2] + LESION_IJK[2] * SPACING[2]])


def _write_ras_nrrd(path: Path, origin_ras) -> np.ndarray:
    """A NRRD in RAS space: world RAS of voxel (i, j, k) = origin + (i dx, j dy, k dz)."""
    data = _phantom()
    header = (
        "NRRD0004\ntype: float\ndimension: 3\nspace: right-anterior-superior\n"
        f"sizes: {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
        f"space directions: ({SPACING[0]},0,0) (0,{SPACING[1]},0) (0,0,{SPACING[2]})\n"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n"
        f"space origin: ({origin_ras[0]},{origin_ras[1]},{origin_ras[2]})\n\n"
    )
    path.write_bytes(header.encode("ascii") + data.astype("<f4").tobytes())
    return np.array(origin_ras) + np.array(LESION_IJK) * np.array(SPACING)


@pytest.fixture(params=["LPS-nifti", "RAS-nrrd"])
def composed(request, tmp_path, monkeypatch):
    scene, volumes = make_scene(monkeypatch)
    if request.param == "LPS-nifti":
        path, lesion = tmp_path / "t1.nii.gz", None
        lesion = _write_lps_nifti(path, (-20.0, 30.0, -40.0))
    else:
        path = tmp_path / "t1.nrrd"
        lesion = _write_ras_nrrd(path, (-90.0, -50.0, -40.0))
    t1 = volumes.AddArchetypeVolume(str(path), "T1", 0)
    t2 = volumes.AddArchetypeVolume(str(path), "T2", 0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*(lesion + np.array([8.0, -6.0, 0.0])))
    roi.SetSize(50.0, 40.0, 42.0)
    engine = FAKE_ENGINE.replace(
        "heat = np.where(inside, rng.random(inside.shape), 0.0).astype(np.float32)", HEAT_FROM_INTENSITY)
    assert engine != FAKE_ENGINE
    (tmp_path / "fake_ipmn.py").write_text(engine, encoding="utf-8")
    logic = ClassifierLogic(launcher=fake_launcher(tmp_path), moduleDir=CLASSIFIER_DIR, workRoot=tmp_path / "w",
                            resultsRoot=tmp_path / "r")
    result = logic.process(t1, t2, roi, fake_package(tmp_path / "m"), PredictOptions(device="cpu"), timeout=60)
    composer = SliceComposer(scene, "Axial", size=(256, 256))
    composer.showResult(t1, result.heatmapNode, result.labelNode, opacity=0.5, showLabels=False)
    composer.through(lesion)
    with_overlay = composer.rgba().astype(int)
    composer.show(background=t1)
    background_only = composer.rgba().astype(int)
    composer.showResult(t1, result.heatmapNode, result.labelNode, opacity=0.0, showLabels=True)
    labels_only = composer.rgba().astype(int)
    return {"composer": composer, "lesion": lesion, "t1": t1, "result": result, "overlay": with_overlay,
            "background": background_only, "labels": labels_only, "roi": roi}


def _at(image, composer, ras):
    x, y, z = composer.pixelOf(ras)
    assert abs(z) < 1e-3, "the point is not in the slice plane"
    return image[int(round(y)), int(round(x))]


def test_overlay_is_on_the_lesion_and_absent_outside_the_roi(composed):
    c, lesion = composed["composer"], composed["lesion"]
    change = np.abs(composed["overlay"] - composed["background"]).sum(axis=-1)
    # on the lesion: the heat map is ~1 there, so the composed pixel is clearly tinted
    assert _at(change, c, lesion) > 60
    # 40 mm to the right of the lesion: outside the ROI, exactly the T1 grey
    outside = lesion + np.array([40.0, 0.0, 0.0])
    bounds = [0.0] * 6
    composed["roi"].GetRASBounds(bounds)
    assert not bounds[0] <= outside[0] <= bounds[1]
    assert _at(change, c, outside) == 0
    grey = _at(composed["overlay"], c, outside)
    assert grey[0] == grey[1] == grey[2] > 0
    # nothing changes outside the ROI's footprint in this slice (give or take one voxel: the engine masks
    # voxel centres, and the slice view interpolates)
    rows, cols = np.nonzero(change)
    corners = [c.pixelOf([bounds[a], bounds[b], lesion[2]]) for a in (0, 1) for b in (2, 3)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    voxel_px = abs(c.pixelOf(lesion + np.array([max(SPACING[:2]), 0.0, 0.0]))[0] - c.pixelOf(lesion)[0])
    assert cols.min() >= min(xs) - voxel_px - 1 and cols.max() <= max(xs) + voxel_px + 1
    assert rows.min() >= min(ys) - voxel_px - 1 and rows.max() <= max(ys) + voxel_px + 1
    # ... and the ROI is well inside the view, so this is not trivially true
    assert min(xs) > 20 and max(xs) < change.shape[1] - 20


def test_overlay_is_present_where_the_engines_map_is_high(composed):
    c, heatmap = composed["composer"], composed["result"].heatmapNode
    heat = slicer.util.arrayFromVolume(heatmap)  # (k, j, i)
    change = np.abs(composed["overlay"] - composed["background"]).sum(axis=-1)
    matrix = np.array(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(heatmap)))
    hot = np.argwhere(heat > 0.9)
    assert len(hot) > 0
    checked = 0
    for k, j, i in hot:
        ras = (matrix @ np.array([i, j, k, 1.0]))[:3]
        x, y, z = c.pixelOf(ras)
        if abs(z) < 0.5:  # voxels in the displayed slice
            assert change[int(round(y)), int(round(x))] > 60
            checked += 1
    assert checked > 5


def test_strongest_overlay_and_top_label_sit_on_the_known_lesion(composed):
    c, lesion = composed["composer"], composed["lesion"]
    change = np.abs(composed["overlay"] - composed["background"]).sum(axis=-1)
    rows, cols = np.nonzero(change >= np.percentile(change[change > 0], 95))
    x0, y0, _ = c.pixelOf(lesion)
    x1, y1, _ = c.pixelOf(lesion + np.array([LESION_RADIUS_MM, 0.0, 0.0]))
    radius_px = abs(x1 - x0)
    assert np.hypot(cols.mean() - x0, rows.mean() - y0) < 0.5 * radius_px
    # the label layer: the top 5 % level (red) on the lesion
    r, g, b, _a = _at(composed["labels"], c, lesion)
    assert r > 150 and g < 60 and b < 60


def test_result_layers_match_the_panel_options():
    t1, heat, labels = object(), object(), object()
    assert resultLayers(t1, heat, labels, 0.3, False) == {"background": t1, "foreground": heat,
                                                         "foregroundOpacity": 0.3, "label": None}
    assert resultLayers(t1, heat, labels, 0.3, True)["label"] is labels


def _ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m
