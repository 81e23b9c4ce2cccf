"""Segments by name in the panel's *ROI from segmentation* (slicer-core): the segment is chosen by the engine's
``--mask-segment`` rule (name, terminology meaning or code), and the box equals the engine's for the same file."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest_slicer import CLASSIFIER_DIR, make_scene
from organs_segmentation import write_organs

slicer = pytest.importorskip("slicer")
slicerio = pytest.importorskip("slicerio")

from ipmn.errors import IPMNError  # noqa: E402
from ipmn.phantoms import make_case  # noqa: E402
from ipmn.roi import load_roi  # noqa: E402
from IPMNClassifierLib.logic import ClassifierLogic  # noqa: E402
from IPMNClassifierLib.roitools import SEGMENT_ATTRIBUTE  # noqa: E402


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    """A .seg.nrrd with liver, the pancreas (named 'Segment_2', known only by its terminology) and spleen."""
    case = make_case(3, 2, t1_shape=(96, 96, 30), t2_shape=(96, 96, 30), t1_orientation="LPS")
    # axis-aligned voxels: the engine's box follows the mask's voxel axes, the panel's follows RAS (the same box
    # only when they coincide; an oblique segmentation gives the panel a larger, RAS-aligned box)
    mask = sitk.GetImageFromArray(sitk.GetArrayFromImage(case["mask"]))
    mask.SetSpacing(case["mask"].GetSpacing())
    mask.SetOrigin(case["mask"].GetOrigin())
    path = tmp_path_factory.mktemp("organs") / "organs.seg.nrrd"
    write_organs(path, mask, pancreas_name="Segment_2")
    return path


@pytest.fixture
def loaded(organs, monkeypatch):
    scene, _ = make_scene(monkeypatch)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(organs))
    assert storage.ReadData(node)
    assert node.GetSegmentation().GetNumberOfSegments() == 3
    return node


@pytest.mark.parametrize("choice", ["Pancreas", "pancreas", "SCT^15776009", "Segment_2"])
def test_segment_by_name_or_terminology_gives_the_engines_box(organs, loaded, choice):
    logic = ClassifierLogic(moduleDir=CLASSIFIER_DIR)
    roi = logic.roiFromSegment(loaded, choice, marginMm=10.0)
    engine = load_roi(organs, margin_mm=10.0, segment=choice)  # the same choice through the engine (slicerio)
    np.testing.assert_allclose(roi.GetCenter(), engine.center, atol=1e-3)
    np.testing.assert_allclose(roi.GetSize(), engine.size, atol=1e-3)
    assert roi.GetAttribute(SEGMENT_ATTRIBUTE) == "Segment_2"
    liver = logic.roiFromSegment(loaded, "Liver", marginMm=10.0)
    assert not np.allclose(liver.GetCenter(), engine.center, atol=1.0)
    assert liver.GetAttribute(SEGMENT_ATTRIBUTE) == "liver"


def test_the_id_still_works_and_unknown_names_list_the_segments(loaded):
    logic = ClassifierLogic(moduleDir=CLASSIFIER_DIR)
    pancreas_id = logic.segmentID(loaded, "pancreas")
    assert loaded.GetSegmentation().GetSegment(pancreas_id).GetName() == "Segment_2"
    assert logic.segmentID(loaded, pancreas_id) == pancreas_id
    with pytest.raises(IPMNError) as err:
        logic.roiFromSegment(loaded, "kidney")
    message = str(err.value)
    assert "no segment named or coded 'kidney'" in message
    assert all(f"'{n}'" in message for n in ("liver", "Segment_2", "spleen")) and "(Pancreas)" in message


def test_the_pancreas_is_preselected_by_its_terminology(loaded):
    """TotalSegmentator-like output where the pancreas is known by its code, not its name."""
    pancreas = ClassifierLogic.pancreasSegmentID(loaded)
    assert loaded.GetSegmentation().GetSegment(pancreas).GetName() == "Segment_2"
