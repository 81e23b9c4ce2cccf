"""ROIs: files written by Slicer's own code (slicer-core) read back to the same box; masks and segmentations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ipmn.errors import IPMNError
from ipmn.roi import ROI, load_roi, parse_center_size, read_mrk_json, roi_from_mask, write_mrk_json

slicer = pytest.importorskip("slicer", reason="slicer-core is needed to write ROIs with Slicer's code")
vtk = pytest.importorskip("vtk")


def _slicer_roi(center, size, rotation_deg=0.0):
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    m = vtk.vtkMatrix4x4()
    a = math.radians(rotation_deg)
    m.SetElement(0, 0, math.cos(a))
    m.SetElement(0, 1, -math.sin(a))
    m.SetElement(1, 0, math.sin(a))
    m.SetElement(1, 1, math.cos(a))
    for i in range(3):
        m.SetElement(i, 3, center[i])
    node.SetAndObserveObjectToNodeMatrix(m)
    node.SetSize(*size)
    return scene, node


@pytest.mark.parametrize("rotation", [0.0, 30.0])
def test_slicer_written_mrk_json_reads_back(tmp_path, rotation):
    center, size = (12.5, -40.0, 7.0), (80.0, 60.0, 45.0)
    scene, node = _slicer_roi(center, size, rotation)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    path = tmp_path / "roi.mrk.json"
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    roi = read_mrk_json(path)
    np.testing.assert_allclose(roi.center, center, atol=1e-6)
    np.testing.assert_allclose(roi.size, size, atol=1e-6)
    x_axis = [0.0, 0.0, 0.0]
    node.GetXAxisWorld(x_axis)
    np.testing.assert_allclose(roi.axes[:, 0], x_axis, atol=1e-6)
    np.testing.assert_allclose(roi.corners().mean(0), center, atol=1e-6)


def test_our_mrk_json_is_read_by_slicer(tmp_path):
    roi = ROI([10, 20, -5], [50, 40, 30], np.eye(3))
    path = write_mrk_json(roi, tmp_path / "ours.mrk.json")
    scene = slicer.vtkMRMLScene()
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node = storage.AddNewMarkupsNodeFromFile(str(path))
    assert node is not None
    c = [0.0, 0.0, 0.0]
    node.GetCenterWorld(c)
    np.testing.assert_allclose(c, [10, 20, -5], atol=1e-6)
    np.testing.assert_allclose(list(node.GetSize()), [50, 40, 30], atol=1e-6)


def test_ras_coordinate_system_file(tmp_path):
    doc = {"markups": [{"type": "ROI", "coordinateSystem": "RAS", "center": [1, 2, 3], "size": [4, 5, 6],
                        "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]}]}
    (tmp_path / "r.mrk.json").write_text(json.dumps(doc))
    roi = read_mrk_json(tmp_path / "r.mrk.json")
    np.testing.assert_allclose(roi.center, [1, 2, 3])


def test_center_size_string():
    roi = parse_center_size("10,-20,30:40,50,60")
    np.testing.assert_allclose(roi.center, [10, -20, 30])
    np.testing.assert_allclose(roi.size, [40, 50, 60])
    with pytest.raises(IPMNError, match="R,A,S:W,H,D"):
        parse_center_size("10,20:30")


def _mask(direction=np.eye(3)):
    arr = np.zeros((20, 40, 50), np.uint8)  # z, y, x
    arr[5:10, 10:30, 20:40] = 1  # x 20..39, y 10..29, z 5..9
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((100.0, -50.0, 10.0))
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


def test_roi_from_mask_bounding_box_plus_margin():
    img = _mask()
    roi = roi_from_mask(img, margin_mm=5.0)
    # LPS centre of voxel-index box centre (29.5, 19.5, 7) -> (129.5, -11, 31); RAS flips x, y
    np.testing.assert_allclose(roi.center, [-129.5, 11.0, 31.0])
    np.testing.assert_allclose(roi.size, [20 * 1 + 10, 20 * 2 + 10, 5 * 3 + 10])


def test_seg_nrrd_from_slicer_segmentation(tmp_path):
    """A .seg.nrrd written by Slicer's segmentation storage node gives the segment's bounding box."""
    scene = slicer.vtkMRMLScene()
    img = _mask()
    path = tmp_path / "mask.nrrd"
    sitk.WriteImage(img, str(path))
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    label = logic.AddArchetypeVolume(str(path), "mask", 1)  # 1 = label map
    assert label is not None
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    assert seg_logic.ImportLabelmapToSegmentationNode(label, seg)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    seg_path = tmp_path / "pancreas.seg.nrrd"
    storage.SetFileName(str(seg_path))
    assert storage.WriteData(seg)
    roi = load_roi(seg_path, margin_mm=0.0)
    expected = roi_from_mask(img, margin_mm=0.0)
    np.testing.assert_allclose(roi.center, expected.center, atol=1e-4)
    np.testing.assert_allclose(np.sort(roi.size), np.sort(expected.size), atol=1e-4)


def test_bad_rois(tmp_path):
    with pytest.raises(IPMNError, match="not found"):
        load_roi(tmp_path / "nope.mrk.json")
    (tmp_path / "bad.mrk.json").write_text("{not json")
    with pytest.raises(IPMNError, match="not a readable markups JSON"):
        load_roi(tmp_path / "bad.mrk.json")
    (tmp_path / "fid.mrk.json").write_text(json.dumps({"markups": [{"type": "Fiducial"}]}))
    with pytest.raises(IPMNError, match="no markups ROI"):
        load_roi(tmp_path / "fid.mrk.json")
    with pytest.raises(IPMNError, match="larger than 0"):
        ROI([0, 0, 0], [10, 0, 10], np.eye(3))
    empty = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    with pytest.raises(IPMNError, match="no non-zero"):
        roi_from_mask(empty)
