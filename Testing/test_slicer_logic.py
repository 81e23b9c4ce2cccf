"""The Slicer modules' logic against a real MRML scene (slicer-core, no Slicer application, no Qt).

The engine is replaced by a stand-in script that follows the engine contract (``conftest_slicer.FAKE_ENGINE``)
except in ``test_end_to_end_real_engine``, which runs the real ``python -m ipmn predict`` and worker.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_slicer import (  # puts the module folders on sys.path
    CLASSIFIER_DIR,
    REPO,
    fake_launcher,
    fake_package,
    ijk_to_ras,
    make_scene,
    oblique_direction,
    write_volume,
)

slicer = pytest.importorskip("slicer")

from ipmn import registry  # noqa: E402
from ipmn.errors import IPMNError  # noqa: E402
from IPMNClassifierLib import engine as eng  # noqa: E402
from IPMNClassifierLib.logic import (  # noqa: E402
    ClassifierLogic,
    PredictOptions,
    fileSha256,
    sampleDataSpec,
)
from IPMNClassifierLib.results import HEATMAP_COLOR_IDS  # noqa: E402
from IPMNClassifierLib.roitools import roiSliceCount  # noqa: E402
from IPMNTrainerLib.logic import (  # noqa: E402
    LearningCurves,
    TrainerLogic,
    TrainingOptions,
    TrainingProgress,
    applyOverrides,
    metricRows,
)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def scene(monkeypatch):
    return make_scene(monkeypatch)


def _study(scene_node, *nodes):
    """Put nodes under Patient / Study in the subject hierarchy, as the DICOM module does."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene_node)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MR abdomen")
    for node in nodes:
        sh.CreateItem(study, node)
    return sh, study


@pytest.fixture
def case(tmp_path, scene):
    scene_node, volumes = scene
    t1_path = write_volume(
        tmp_path / "t1.nii.gz",
        shape=(16, 40, 48),
        spacing=(0.9, 0.8, 4.0),
        origin=(10.0, -20.0, 30.0),
        direction=oblique_direction(10.0),
        seed=1,
    )
    t2_path = write_volume(
        tmp_path / "t2.nii.gz", shape=(22, 30, 36), spacing=(1.2, 1.1, 3.0), origin=(8.0, -22.0, 28.0), seed=2
    )
    t1 = volumes.AddArchetypeVolume(str(t1_path), "T1", 0)
    t2 = volumes.AddArchetypeVolume(str(t2_path), "T2", 0)
    assert t1 is not None and t2 is not None
    sh, study = _study(scene_node, t1, t2)
    bounds = [0.0] * 6
    t1.GetRASBounds(bounds)
    roi = scene_node.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*[(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
    roi.SetSize(24.0, 20.0, 40.0)
    model = fake_package(tmp_path / "models" / "tiny", name="Tiny test model")
    return {
        "scene": scene_node,
        "volumes": volumes,
        "t1": t1,
        "t2": t2,
        "roi": roi,
        "sh": sh,
        "study": study,
        "model": model,
        "tmp": tmp_path,
    }


def _logic(case, mode="", **kw):
    tmp = case["tmp"]
    return ClassifierLogic(
        launcher=fake_launcher(tmp, mode, **kw),
        moduleDir=CLASSIFIER_DIR,
        workRoot=tmp / "work",
        resultsRoot=tmp / "results",
    )


def _tableRows(tableNode) -> dict:
    """A result table's Item -> Value rows."""
    table = tableNode.GetTable()
    return {table.GetValueByName(r, "Item").ToString(): table.GetValueByName(r, "Value").ToString()
            for r in range(table.GetNumberOfRows())}


def _process(logic, case, options=None, roi=None):
    return logic.process(
        case["t1"],
        case["t2"],
        roi or case["roi"],
        case["model"],
        options or PredictOptions(device="cpu"),
        timeout=60,
    )


# ----------------------------------------------------------------------------------------------- classifier
def test_outputs_in_t1_geometry_with_documented_labels_table_and_hierarchy(case):
    logic = _logic(case)
    events = []
    result = logic.process(
        case["t1"],
        case["t2"],
        case["roi"],
        case["model"],
        PredictOptions(device="cpu"),
        onEvent=events.append,
        timeout=60,
    )
    t1 = case["t1"]
    assert any(e.get("event") == "stage" for e in events)

    # geometry: exactly T1's (dimensions and IJK-to-RAS), same parent transform
    for node in (result.heatmapNode, result.labelNode):
        assert node.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(t1))
    assert result.labelNode.IsA("vtkMRMLLabelMapVolumeNode")
    assert not result.heatmapNode.IsA("vtkMRMLLabelMapVolumeNode")

    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    labels = slicer.util.arrayFromVolume(result.labelNode)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    assert np.all(heat[labels > 0] > 0)  # labels only inside the ROI where attention is
    # top 20 % >= top 10 % >= top 5 %: nested levels
    counts = [(labels >= level).sum() for level in (1, 2, 3)]
    assert counts[0] > counts[1] > counts[2] > 0

    # display: heat-map colour map in [0, 1] with a threshold; label map with the attention-level colour table
    display = result.heatmapNode.GetDisplayNode()
    assert display.GetColorNodeID() in HEATMAP_COLOR_IDS
    assert display.GetApplyThreshold() and display.GetWindow() == pytest.approx(1.0)
    colors = result.labelNode.GetDisplayNode().GetColorNode()
    assert colors.GetName() == "IPMN attention levels"
    assert [colors.GetColorName(i) for i in (1, 2, 3)] == [
        "top 20% attention",
        "top 10% attention",
        "top 5% attention",
    ]

    # table: probabilities sum to 1, predicted class recorded
    probs = ClassifierLogic.tableProbabilities(result.tableNode)
    assert set(probs) == {"normal", "low", "high"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert result.tableNode.GetAttribute("IPMN.PredictedClass") == result.predictedClass
    items = _tableRows(result.tableNode)
    assert {"Model", "Model card", "Uncertainty (entropy)", "Predicted class"} <= set(items)

    # subject hierarchy: every output under the T1's study
    sh, study = case["sh"], case["study"]
    level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    for node in (result.tableNode, result.heatmapNode, result.labelNode):
        item = sh.GetItemByDataNode(node)
        assert item and sh.GetItemAncestorAtLevel(item, level) == study

    # files: temporary inputs removed, grid PNG and prediction.json kept
    assert list((case["tmp"] / "work").iterdir()) == []
    assert result.gridPng is not None and result.gridPng.is_file()
    assert json.loads((result.resultDir / "prediction.json").read_text())["schema"] == "ipmn.prediction/1"
    # device cpu is forced on the engine process (CUDA hidden)
    args = result.prediction["args"]
    assert args["device"] == "cpu" and args["cuda_visible"] == "-1"


def test_attention_levels_also_as_coded_nested_segments(case):
    """A Segmentation node beside the label map: segment n = label >= n, with DICOM terminology (SEG export)."""
    result = _process(_logic(case), case)
    nodes = case["scene"].GetNodesByClass("vtkMRMLSegmentationNode")
    found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    found = [n for n in found if n.GetAttribute("IPMN.Role") == "attention_segments"]
    assert len(found) == 1
    node = found[0]
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    labels = slicer.util.arrayFromVolume(result.labelNode)
    for level, pct in zip((1, 2, 3), (20, 10, 5), strict=True):
        segment_id = segmentation.GetNthSegmentID(level - 1)
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == f"top {pct}% attention"
        tag = __import__("vtk").reference("")
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        tag = str(tag)
        assert f"99IPMN^ATTN{pct}^Top {pct} % of model attention" in tag and "SCT^15776009^Pancreas" in tag
        exported = case["scene"].AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
        ids = __import__("vtk").vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, exported,
                                                                                     result.labelNode)
        mask = slicer.util.arrayFromVolume(exported)
        assert mask.shape == labels.shape and np.array_equal(mask > 0, labels >= level)
        case["scene"].RemoveNode(exported)
    sh = case["sh"]
    level_study = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    assert sh.GetItemAncestorAtLevel(sh.GetItemByDataNode(node), level_study) == case["study"]


def test_rerun_replaces_outputs_instead_of_adding(case):
    logic = _logic(case)
    first = _process(logic, case)
    count = case["scene"].GetNumberOfNodes()
    ids = (first.tableNode.GetID(), first.heatmapNode.GetID(), first.labelNode.GetID())
    second = _process(logic, case, PredictOptions(device="cpu", windows="all", tta=True))
    assert (second.tableNode.GetID(), second.heatmapNode.GetID(), second.labelNode.GetID()) == ids
    assert case["scene"].GetNumberOfNodes() == count
    assert second.prediction["windows"]["mode"] == "all" and second.prediction["args"]["tta"] is True
    sh = case["sh"]
    children = __import__("vtk").vtkIdList()
    sh.GetItemChildren(case["study"], children, False)
    folders = [
        children.GetId(i)
        for i in range(children.GetNumberOfIds())
        if sh.GetItemAttribute(children.GetId(i), "IPMN.InputKey")
    ]
    assert len(folders) == 1
    # another ROI is another case: new nodes
    roi2 = case["scene"].AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI 2")
    roi2.SetCenter(*case["roi"].GetCenter())
    roi2.SetSize(22.0, 18.0, 40.0)
    third = _process(logic, case, roi=roi2)
    assert third.heatmapNode.GetID() not in ids


def test_worker_stays_loaded_between_cases_and_restarts_when_device_changes(case):
    logic = _logic(case)
    items = []
    task = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"], PredictOptions(device="auto"))
    first = logic.startAsync(task, keepEngineLoaded=True).wait(timeout=60, onItem=items.append)
    worker = logic.worker
    assert worker is not None and worker.alive
    task2 = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"], PredictOptions(device="auto"))
    second = logic.startAsync(task2).wait(timeout=60)
    assert logic.worker is worker
    assert second.prediction["args"]["pid"] == first.prediction["args"]["pid"] == worker.run.pid
    assert any(kind == "progress" for kind, _ in items)
    assert not task.workDir.exists() and not task2.workDir.exists()
    task3 = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"], PredictOptions(device="cpu"))
    third = logic.startAsync(task3).wait(timeout=60)
    assert logic.worker is not worker and not worker.alive
    assert third.prediction["args"]["cuda_visible"] == "-1"
    logic.stopWorker()
    assert logic.worker is None


def test_fold_ensemble_passes_all_members(case):
    members = [fake_package(case["tmp"] / "ens" / f"fold_{i}", name=f"fold {i}") for i in range(3)]
    info = registry.register_ensemble(members, "CV folds", models_dir=case["tmp"] / "registry")
    assert info.is_ensemble and info.valid
    options = PredictOptions(device="cpu", ensemble=[str(m) for m in info.ensemble_members])
    logic = _logic(case)
    task = logic.prepare(case["t1"], case["t2"], case["roi"], info, options)
    args = task.predictArgs()
    assert args[args.index("--model") + 1] == str(info.primary)
    assert args[args.index("--ensemble") + 1 : args.index("--progress")] == [str(m) for m in info.members]
    assert task.workerRequest()["ensemble"] == [str(m) for m in info.members]
    result = logic.startAsync(task, keepEngineLoaded=False).wait(timeout=60)
    assert result.prediction["uncertainty"]["ensemble_std"] is not None
    logic.stopWorker()


def test_engine_errors_are_translated_and_temp_folders_removed(case):
    with pytest.raises(eng.EngineError) as info:
        _process(_logic(case, "user_error"), case)
    assert str(info.value) == "the ROI covers 3 slices; k=9 needs 9"
    assert info.value.exit_code == 2
    with pytest.raises(eng.EngineError) as info:
        _process(_logic(case, "crash"), case)
    assert info.value.exit_code == 1 and info.value.out_of_memory
    assert "memory" in str(info.value)
    assert "DefaultCPUAllocator" in info.value.details()
    # worker crash while busy: the request fails with the exit status in words
    logic = _logic(case, "crash")
    task = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"])
    with pytest.raises(eng.EngineError) as info:
        logic.startAsync(task).wait(timeout=60)
    assert info.value.exit_code == 139 and "Segmentation fault" in str(info.value)
    # worker user error: the worker survives
    logic = _logic(case, "user_error")
    task = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"])
    with pytest.raises(eng.EngineError, match="k=9 needs 9"):
        logic.startAsync(task).wait(timeout=60)
    assert logic.worker.alive
    logic.stopWorker()
    assert list((case["tmp"] / "work").iterdir()) == []


@pytest.mark.parametrize("with_psutil", [True, False])
def test_cancel_kills_the_whole_process_tree(case, monkeypatch, with_psutil):
    psutil = pytest.importorskip("psutil")
    if not with_psutil:  # the fallback: the engine's process group (POSIX) / taskkill /T (Windows)
        monkeypatch.setattr(eng, "kill_process_tree", eng._kill_tree_without_psutil)
    logic = _logic(case, "spawn_and_hang")
    task = logic.prepare(case["t1"], case["t2"], case["roi"], case["model"])
    pending = logic.startAsync(task, keepEngineLoaded=False)
    pid_file = task.outDir / "child.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        pending.poll()
        time.sleep(0.05)
    child = int(pid_file.read_text())
    engine_pid = pending.run.pid
    pending.cancel()
    with pytest.raises(eng.EngineError) as info:
        pending.wait(timeout=30)
    assert info.value.cancelled

    def gone(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert gone(engine_pid) and gone(child)
    assert not task.workDir.exists()


def test_check_inputs_explains_what_is_wrong(case):
    logic = _logic(case)
    t1, t2, roi, scene_node = case["t1"], case["t2"], case["roi"], case["scene"]
    assert logic.checkInputs(t1, t2, roi, case["model"]) == []
    problems = logic.checkInputs(None, None, None)
    assert problems == [
        "Select the T1 volume.",
        "Select the T2 volume.",
        "Select an ROI around the pancreas (Create ROI, or ROI from segmentation).",
    ]
    assert "same volume" in " ".join(logic.checkInputs(t1, t1, roi))
    far = scene_node.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    far.SetCenter(500.0, 500.0, 500.0)
    far.SetSize(30.0, 30.0, 40.0)
    text = " ".join(logic.checkInputs(t1, t2, far))
    assert "outside the T1 volume" in text and "outside the T2 volume" in text
    thin = scene_node.AddNewNodeByClass("vtkMRMLMarkupsROINode", "thin")
    thin.SetCenter(*roi.GetCenter())
    thin.SetSize(24.0, 20.0, 18.0)
    count, extent, spacing = roiSliceCount(thin, t1)
    assert (count, spacing) == (4, pytest.approx(4.0))
    assert any(
        "too thin" in p and "covers 4 T1 slice(s)" in p and "needs 9" in p
        for p in logic.checkInputs(t1, t2, thin, case["model"])
    )
    assert logic.checkInputs(t1, t2, thin, k=4) == []
    unplaced = scene_node.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    assert "not placed" in logic.checkInputs(t1, t2, unplaced)[0]
    transform = scene_node.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t2.SetAndObserveTransformNodeID(transform.GetID())
    assert "harden the transforms" in " ".join(logic.checkInputs(t1, t2, roi))
    t2.SetAndObserveTransformNodeID(None)
    broken = case["tmp"] / "broken_model"
    broken.mkdir()
    text = " ".join(logic.checkInputs(t1, t2, roi, broken))
    assert "model.safetensors is missing" in text and "config.json is missing" in text
    with pytest.raises(IPMNError, match="Select the T2 volume"):
        logic.prepare(t1, None, roi, case["model"])
    assert not (case["tmp"] / "work").exists() or list((case["tmp"] / "work").iterdir()) == []


def test_model_k_is_read_from_the_package(case):
    four = fake_package(case["tmp"] / "k4", k=4)
    assert ClassifierLogic.modelK(four) == 4
    assert ClassifierLogic.modelK(case["tmp"]) == 9  # no config: the paper's k


def test_create_roi_at_position_and_under_the_volume_transform(case):
    logic = _logic(case)
    roi = logic.createRoi(center=[1.0, 2.0, 3.0])
    assert list(roi.GetCenter()) == pytest.approx([1.0, 2.0, 3.0])
    assert list(roi.GetSize()) == pytest.approx([100.0, 70.0, 60.0])
    assert roi.GetDisplayNode() is not None
    t1 = case["t1"]
    centred = logic.createRoi(referenceVolume=t1)
    bounds = [0.0] * 6
    t1.GetRASBounds(bounds)
    assert list(centred.GetCenter()) == pytest.approx(
        [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    )
    transform = case["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = __import__("vtk").vtkMatrix4x4()
    matrix.SetElement(0, 3, 15.0)
    transform.SetMatrixTransformToParent(matrix)
    t1.SetAndObserveTransformNodeID(transform.GetID())
    moved = logic.createRoi(center=[20.0, 0.0, 0.0], size=(30, 30, 40), referenceVolume=t1)
    assert moved.GetTransformNodeID() == transform.GetID()
    assert list(moved.GetCenter()) == pytest.approx([5.0, 0.0, 0.0])  # local = world - translation
    world = [0.0, 0.0, 0.0]
    moved.GetCenterWorld(world)
    assert world == pytest.approx([20.0, 0.0, 0.0])


def test_roi_from_segmentation_is_bounding_box_plus_margin(case):
    scene_node = case["scene"]
    mask = np.zeros((20, 30, 40), np.uint8)  # (k, j, i)
    mask[5:10, 8:20, 10:30] = 1
    ijk_to_ras_matrix = np.array([[-1.0, 0, 0, 5.0], [0, -1.0, 0, 6.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])
    label = slicer.util.addVolumeFromArray(
        mask, ijkToRAS=ijk_to_ras_matrix, name="pancreas", nodeClassName="vtkMRMLLabelMapVolumeNode"
    )
    seg = scene_node.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    segment_id = seg.GetSegmentation().GetNthSegmentID(0)
    logic = _logic(case)
    bounds = logic.segmentBoundsRAS(seg, segment_id)
    # i 10..29 -> R = 5 - i, j 8..19 -> A = 6 - j, k 5..9 -> S = -7 + 2k; voxel edges +-half a voxel
    assert bounds.tolist() == pytest.approx([-24.5, -4.5, -13.5, -1.5, 2.0, 12.0])
    roi = logic.roiFromSegment(seg, segment_id, marginMm=10.0)
    assert list(roi.GetCenter()) == pytest.approx([-14.5, -7.5, 7.0])
    assert list(roi.GetSize()) == pytest.approx([40.0, 32.0, 30.0])
    # an existing ROI node is updated, not duplicated
    again = logic.roiFromSegment(seg, segment_id, marginMm=5.0, roiNode=roi)
    assert again is roi and list(roi.GetSize()) == pytest.approx([30.0, 22.0, 20.0])
    other = mask.copy()
    other[other > 0] = 0
    other[15:17, 0:3, 0:3] = 2  # a second segment in the same (shared) labelmap layer
    label2 = slicer.util.addVolumeFromArray(
        mask + other, ijkToRAS=ijk_to_ras_matrix, name="two", nodeClassName="vtkMRMLLabelMapVolumeNode"
    )
    seg2 = scene_node.AddNewNodeByClass("vtkMRMLSegmentationNode", "two segments")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label2, seg2)
    first = seg2.GetSegmentation().GetNthSegmentID(0)
    assert logic.segmentBoundsRAS(seg2, first).tolist() == pytest.approx(bounds.tolist())
    empty_id = seg.GetSegmentation().AddEmptySegment("empty")
    with pytest.raises(IPMNError, match="empty"):
        logic.roiFromSegment(seg, empty_id)
    with pytest.raises(IPMNError, match="select a segmentation"):
        logic.roiFromSegment(None, "")


def test_roi_file_round_trip_keeps_center_and_size(case, tmp_path):
    path = ClassifierLogic.writeRoi(case["roi"], tmp_path / "roi.mrk.json")
    data = json.loads(path.read_text())["markups"][0]
    assert data["type"] == "ROI" and data["coordinateSystem"] == "LPS"
    center = case["roi"].GetCenter()
    assert data["center"] == pytest.approx([-center[0], -center[1], center[2]])
    assert data["size"] == pytest.approx([24.0, 20.0, 40.0])


def test_sample_data_spec_with_checksums(tmp_path):
    spec = sampleDataSpec(CLASSIFIER_DIR)  # the repository's Resources/SampleData when run from sources
    if spec is None:
        pytest.skip("Resources/SampleData is not in the repository yet")
    assert len(spec["uris"]) == 4 and all(u.startswith("file://") for u in spec["uris"])
    assert spec["loadFileTypes"] == ["VolumeFile", "VolumeFile", "MarkupsFile", "SegmentationFile"]
    first = Path(spec["uris"][0][len("file://") :])
    assert spec["checksums"][0] == "SHA256:" + fileSha256(first)
    # a SHA256SUMS file next to the data is used as is
    copy = tmp_path / "Resources" / "SampleData"
    copy.mkdir(parents=True)
    for uri in spec["uris"]:
        src = Path(uri[len("file://") :])
        (copy / src.name).write_bytes(src.read_bytes())
    (copy / "SHA256SUMS").write_text(f"{'0' * 64}  sample_t1.nii.gz\n")
    spec2 = sampleDataSpec(tmp_path)
    assert spec2["checksums"][0] == "SHA256:" + "0" * 64
    assert spec2["checksums"][1] == spec["checksums"][1]


# ----------------------------------------------------------------------------------------------- engine client
def test_parse_event_and_describe_exit():
    assert eng.parse_event('{"event": "stage", "stage": "resample", "fraction": 0.3}')["stage"] == "resample"
    assert eng.parse_event("loading model...") is None
    assert eng.parse_event('{"no_event": 1}') is None
    assert eng.parse_event("{not json}") is None
    assert (
        eng.describe_exit(2, ["x", "ipmn: error: ROI outside the T1 volume"]) == "ROI outside the T1 volume"
    )
    assert "out of memory" in eng.describe_exit(-9, [])
    assert "out of memory" in eng.describe_exit(137, [])
    assert "missing DLL" in eng.describe_exit(-1073741515, [])  # 0xC0000135 as a signed int
    assert "missing DLL" in eng.describe_exit(0xC0000135, [])
    assert "Python error: ValueError: bad" in eng.describe_exit(1, ["Traceback", "ValueError: bad"])
    assert eng.looks_out_of_memory(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"])


def test_launcher_environment_and_command(tmp_path):
    launcher = eng.EngineLauncher(
        python="/opt/Slicer/bin/PythonSlicer",
        module_dir=tmp_path,
        base_env={"PYTHONPATH": "/x", "PATH": "/bin"},
    )
    assert launcher.command("predict", "--t1", Path("/a b/t1.nrrd")) == [
        "/opt/Slicer/bin/PythonSlicer",
        "-m",
        "ipmn",
        "predict",
        "--t1",
        "/a b/t1.nrrd",
    ]
    env = launcher.environment("cpu")
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path) and env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8"
    assert "CUDA_VISIBLE_DEVICES" not in launcher.environment("auto")


def test_non_ascii_paths_reach_the_engine(case, tmp_path):
    work = tmp_path / "Müller Ø 数据"
    logic = ClassifierLogic(
        launcher=fake_launcher(tmp_path),
        moduleDir=CLASSIFIER_DIR,
        workRoot=work,
        resultsRoot=work / "results",
    )
    result = _process(logic, case)
    assert sum(result.probabilities.values()) == pytest.approx(1.0)


def test_model_listing_includes_bundled_and_registered(case, tmp_path, monkeypatch):
    monkeypatch.setenv("IPMN_MODELS_DIR", str(tmp_path / "user-models"))
    logic = _logic(case)
    bundled = tmp_path / "module" / "Resources" / "DemoModel"
    fake_package(bundled, name="Demo")
    logic.moduleDir = tmp_path / "module"
    assert [m.name for m in logic.listModels()] == ["Demo"]
    info = logic.addModelFolder(case["model"])
    names = [m.name for m in logic.listModels()]
    assert names == ["Demo", "Tiny test model"] and info.source == "user"


# ----------------------------------------------------------------------------------------------- trainer
def test_trainer_builds_the_documented_commands(tmp_path):
    options = TrainingOptions(
        cohort=tmp_path / "cohort.csv",
        output=tmp_path / "run",
        kind="cv",
        models=["vit_base", "densenet121"],
        modalities="t1t2",
        fusion="late",
        outer=10,
        inner=3,
        device="cpu",
        resume=True,
        epochs=30,
        lr=0.003,
        batchSize=8,
    )
    assert TrainerLogic.buildArgs(options, tmp_path / "c.yaml") == [
        "cv",
        "--cohort",
        str(tmp_path / "cohort.csv"),
        "--config",
        str(tmp_path / "c.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--epochs",
        "30",
        "--lr",
        "0.003",
        "--batch-size",
        "8",
        "--outer",
        "10",
        "--inner",
        "3",
        "--models",
        "vit_base",
        "densenet121",
        "--modalities",
        "t1t2",
        "--fusion",
        "late",
        "--resume",
        "--progress",
        "jsonl",
    ]
    train = TrainingOptions(
        cohort=tmp_path / "cohort.csv",
        output=tmp_path / "model",
        kind="train",
        models=["vit_tiny"],
        epochs=5,
        lr=1e-4,
        batchSize=16,
    )
    assert TrainerLogic.buildArgs(train, "c.yaml") == [
        "train",
        "--cohort",
        str(tmp_path / "cohort.csv"),
        "--config",
        "c.yaml",
        "--out",
        str(tmp_path / "model"),
        "--device",
        "auto",
        "--epochs",
        "5",
        "--lr",
        "0.0001",
        "--batch-size",
        "16",
        "--arch",
        "vit_tiny",
        "--modalities",
        "t1t2",
        "--fusion",
        "early",
        "--progress",
        "jsonl",
    ]
    assert options.totalFolds == 20 and train.totalFolds == 1
    logic = TrainerLogic()
    problems = logic.checkOptions(TrainingOptions(cohort=tmp_path / "missing.csv", output=tmp_path, k=8))
    assert any("cohort" in p for p in problems) and any("perfect square" in p for p in problems)
    two = TrainingOptions(cohort=tmp_path, output=tmp_path / "m", kind="train", models=["a", "b"])
    assert any("one architecture" in p for p in logic.checkOptions(two))


def test_trainer_progress_parsing():
    progress = TrainingProgress(totalFolds=2, innerFolds=2)
    state = progress.update(
        {
            "event": "epoch",
            "fold": 0,
            "inner": 0,
            "epoch": 5,
            "epochs": 10,
            "train_loss": 0.5,
            "val_loss": 0.6,
            "val_acc": 0.7,
            "eta_s": 12.0,
        }
    )
    assert state["foldFraction"] == pytest.approx(0.5 / 3)
    assert state["overallFraction"] == pytest.approx(0.5 / 3 / 2)
    assert state["foldEta"] == 12.0 and "fold 0" in state["text"] and "inner 0" in state["text"]
    state = progress.update({"event": "epoch", "fold": 0, "epoch": 10, "epochs": 10})  # final model of fold 0
    assert state["foldFraction"] == pytest.approx(1.0)
    state = progress.update({"event": "fold_done", "fold": 0, "metrics": {"accuracy": 0.7}})
    assert state["foldsDone"] == 1 and state["overallFraction"] == pytest.approx(0.5)
    plain = TrainingProgress(totalFolds=1)
    assert plain.update({"event": "epoch", "fold": 0, "epoch": 0, "epochs": 4})[
        "foldFraction"
    ] == pytest.approx(0.25)
    assert plain.update({"event": "epoch", "fold": 0, "epoch": 1, "epochs": 4})[
        "foldFraction"
    ] == pytest.approx(0.5)
    events = []
    for line in [
        '{"event":"epoch","fold":1,"epoch":1,"epochs":2}',
        "Epoch 1 done",
        '{"event":"done","out":"x"}',
    ]:
        event = eng.parse_event(line)
        events.append(event["event"] if event else "log")
    assert events == ["epoch", "log", "done"]


def test_trainer_config_overrides():
    config = {
        "model": {"arch": "vit_small", "k": 9, "modalities": ["t1", "t2"]},
        "train": {"lr": 0.1, "batch_size": 4, "epochs": 3},
    }
    notes = applyOverrides(
        config, {"epochs": 20, "lr": 1e-4, "batch_size": 16, "k": 4, "modalities": ["t2"], "fusion": "late"}
    )
    assert config == {
        "model": {"arch": "vit_small", "k": 4, "modalities": ["t2"]},
        "train": {"lr": 1e-4, "batch_size": 16, "epochs": 20},
    }
    assert len(notes) == 1 and "fusion" in notes[0]


def test_trainer_writes_config_from_the_engine_preset(tmp_path):
    pytest.importorskip("yaml")
    import yaml

    logic = TrainerLogic()
    if logic.defaultConfig() is None:
        pytest.skip("no engine preset yet")
    options = TrainingOptions(
        cohort=tmp_path,
        output=tmp_path / "run",
        epochs=7,
        lr=0.002,
        batchSize=4,
        k=4,
        modalities="t1",
        fusion="late",
    )
    path, notes = logic.writeRunConfig(options, tmp_path)
    config = yaml.safe_load(path.read_text())
    assert (
        config["train"]["epochs"] == 7
        and config["train"]["lr"] == 0.002
        and config["train"]["batch_size"] == 4
    )
    assert (
        config["model"]["k"] == 4
        and config["model"]["modalities"] == ["t1"]
        and config["model"]["fusion"] == "late"
    )
    assert notes == []


def test_trainer_cv_run_curves_results_and_registration(scene, tmp_path):
    pytest.importorskip("yaml")
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  arch: vit_tiny\n  k: 9\ntrain:\n  epochs: 3\n  lr: 0.001\n  batch_size: 8\n")
    logic = TrainerLogic(launcher=fake_launcher(tmp_path))
    logic.modelsDir = tmp_path / "models"
    options = TrainingOptions(
        cohort=tmp_path,
        output=tmp_path / "run",
        kind="cv",
        config=base,
        models=["vit_tiny"],
        outer=2,
        inner=2,
        epochs=3,
    )
    curves = LearningCurves()
    run = logic.start(options, curves)
    items = []
    done = run.wait(onItem=items.append, timeout=60)
    run.cleanup()
    assert done["out"] == str(tmp_path / "run")
    progress = [payload for kind, payload in items if kind == "progress"]
    assert progress[-1]["overallFraction"] == pytest.approx(1.0) and progress[-1]["foldsDone"] == 2
    assert [kind for kind, _ in items].count("fold_done") == 2
    # learning curves: one table per (fold, inner fold / final model), loss series in one chart
    assert len(curves.tables) == 2 * 3
    table = curves.tables[("vit_tiny", 0, None)]
    assert table.GetNumberOfRows() == 3
    assert table.GetTable().GetColumnByName("train_loss").GetValue(2) == pytest.approx(1 / 3)
    chart = curves.chartNode()
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * 6
    # results table from metrics.json
    results = logic.resultsTable(tmp_path / "run")
    vtable = results.GetTable()
    names = [vtable.GetColumn(0).GetValue(r) for r in range(vtable.GetNumberOfRows())]
    assert names[:2] == ["accuracy", "balanced_accuracy"]
    assert vtable.GetColumnName(2) == "Std (ddof=1)"
    assert [vtable.GetColumnName(c) for c in range(3, vtable.GetNumberOfColumns())] == ["fold 0", "fold 1"]
    assert vtable.GetColumn(1).GetValue(0) == pytest.approx(0.55)
    assert vtable.GetColumn(3).GetValue(0) == pytest.approx(0.5) and vtable.GetColumn(4).GetValue(
        0
    ) == pytest.approx(0.6)
    assert "accuracy: 0.550 ± 0.071" in TrainerLogic.resultsText(results)
    assert logic.resultsTable(tmp_path / "run") is results  # the same run fills the same table
    # register the fold ensemble: selectable by the classifier
    infos = logic.registerTrainedModel(tmp_path / "run", "cv", "My CV model")
    assert len(infos) == 1 and infos[0].is_ensemble and len(infos[0].members) == 2
    listed = registry.list_models((), tmp_path / "models")
    assert [m.name for m in listed] == ["My CV model"]
    # a second run resets the curves
    run = logic.start(options, curves)
    run.wait(timeout=60)
    run.cleanup()
    assert len(curves.tables) == 6 and curves.chartNode().GetNumberOfPlotSeriesNodes() == 12


def test_trainer_stop_kills_and_can_resume(scene, tmp_path):
    pytest.importorskip("yaml")
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 3\n")
    logic = TrainerLogic(launcher=fake_launcher(tmp_path, "hang"))
    options = TrainingOptions(cohort=tmp_path, output=tmp_path / "run", config=base, outer=2, inner=2)
    run = logic.start(options, LearningCurves())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(k == "progress" for k, _ in run.poll()):
        time.sleep(0.05)
    run.cancel()
    with pytest.raises(eng.EngineError) as info:
        run.wait(timeout=30)
    assert info.value.cancelled
    options.resume = True
    assert "--resume" in TrainerLogic.buildArgs(options, base)


def test_results_table_handles_plain_numbers_and_models(scene, tmp_path):
    metrics = {
        "summary": {"vit_base": {"accuracy": {"mean": 0.7, "std": 0.1, "ddof": 1}, "macro_f1": 0.6}},
        "folds": [
            {"fold": 0, "model": "vit_base", "metrics": {"accuracy": 0.6, "confusion": [[1, 0], [0, 1]]}},
            {"fold": 1, "model": "vit_base", "metrics": {"accuracy": 0.8}},
        ],
        "models": ["vit_base"],
    }
    rows, columns, per_fold = metricRows(metrics)
    assert [r[0] for r in rows] == ["vit_base/accuracy", "vit_base/macro_f1"]
    assert columns == ["fold 0", "fold 1"]
    only_folds = {
        "folds": [{"fold": 0, "metrics": {"accuracy": 0.5}}, {"fold": 1, "metrics": {"accuracy": 0.7}}]
    }
    rows2, _, _ = metricRows(only_folds)
    assert (
        rows2[0][0] == "accuracy"
        and rows2[0][1] == pytest.approx(0.6)
        and rows2[0][2] == pytest.approx(0.1414, abs=1e-4)
    )
    assert per_fold["vit_base/accuracy"] == {"fold 0": 0.6, "fold 1": 0.8}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    table = TrainerLogic().resultsTable(tmp_path)
    assert math.isnan(table.GetTable().GetColumn(2).GetValue(1))  # no std for a plain number
    with pytest.raises(IPMNError, match="has not finished"):
        TrainerLogic().resultsTable(tmp_path / "nothing")


def test_results_table_from_the_engine_report_layout(scene, tmp_path):
    """metrics.json as ipmn.report writes it: the first variant at the top level, every variant in 'models'."""

    def entry(name, accs):
        folds = [
            {"fold": i, "metrics": {"accuracy": a, "macro_auc": float("nan"), "confusion": [[1]]}}
            for i, a in enumerate(accs)
        ]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
        return {
            "name": name,
            "summary": {
                "accuracy": {"mean": mean, "std": std, "ddof": 1, "n": 2},
                "macro_auc": {"mean": float("nan"), "std": float("nan"), "ddof": 1},
            },
            "folds": folds,
        }

    one, two = entry("vit_base", [0.6, 0.8]), entry("densenet121", [0.5, 0.7])
    metrics = {"ddof": 1, "summary": one["summary"], "folds": one["folds"], "models": [one, two]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    table = TrainerLogic().resultsTable(tmp_path)
    vtable = table.GetTable()
    names = [vtable.GetColumn(0).GetValue(r) for r in range(vtable.GetNumberOfRows())]
    assert names == [
        "vit_base/accuracy",
        "vit_base/macro_auc",
        "densenet121/accuracy",
        "densenet121/macro_auc",
    ]
    assert [vtable.GetColumnName(c) for c in range(vtable.GetNumberOfColumns())] == [
        "Metric",
        "Mean",
        "Std (ddof=1)",
        "fold 0",
        "fold 1",
    ]
    assert vtable.GetColumn(1).GetValue(2) == pytest.approx(0.6)
    assert vtable.GetColumn(4).GetValue(2) == pytest.approx(0.7)
    single = {"summary": one["summary"], "folds": one["folds"], "models": [one]}
    (tmp_path / "metrics.json").write_text(json.dumps(single))
    rows, _, _ = metricRows(single)
    assert [r[0] for r in rows] == ["accuracy", "macro_auc"]


def test_trainer_cohort_summary(tmp_path):
    pytest.importorskip("ipmn.cohort")
    for name in ("a_t1.nii.gz", "a_t2.nii.gz", "a.mrk.json", "b_t1.nii.gz", "b_t2.nii.gz", "b.mrk.json"):
        (tmp_path / name).write_bytes(b"x")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "case_id,t1,t2,roi,label,center\n"
        "a,a_t1.nii.gz,a_t2.nii.gz,a.mrk.json,high,A\n"
        "b,b_t1.nii.gz,b_t2.nii.gz,b.mrk.json,low,B\n"
    )
    summary, text = TrainerLogic().cohortSummary(manifest)
    assert summary["n_cases"] == 2 and summary["per_class"]["high"] == 1
    assert "2 cases" in text and "per centre: A 1, B 1" in text
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,t1,t2,roi,label\na,missing.nii.gz,a_t2.nii.gz,a.mrk.json,weird\n")
    with pytest.raises(IPMNError) as info:
        TrainerLogic().cohortSummary(bad)
    assert "unknown label" in str(info.value) and "not found" in str(info.value)


# ----------------------------------------------------------------------------------------------- real engine
def _real_engine_available() -> bool:
    try:
        import ipmn.predict  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means the engine is not ready
        return False
    return True


@pytest.mark.skipif(not _real_engine_available(), reason="ipmn.predict cannot be imported yet")
def test_end_to_end_real_engine(scene, tmp_path):
    """The real ``python -m ipmn predict`` and ``ipmn worker`` with a small random ViT, loaded by the logic."""
    from ipmn.models import build_model, save_package

    scene_node, volumes = scene
    config = {
        "arch": "vit_tiny_patch16_224",
        "depth": 2,
        "pretrained": None,
        "modalities": ["t1", "t2"],
        "k": 9,
        "cell": 64,
        "class_names": ["normal", "low", "high"],
    }
    package = {**config, "name": "tiny-e2e", "card": "random weights, test only"}
    model_dir = save_package(tmp_path / "model", build_model(config), package)
    sample = REPO / "Resources" / "SampleData"
    if (sample / "sample_t1.nii.gz").is_file():
        t1 = volumes.AddArchetypeVolume(str(sample / "sample_t1.nii.gz"), "T1", 0)
        t2 = volumes.AddArchetypeVolume(str(sample / "sample_t2.nii.gz"), "T2", 0)
        roi = scene_node.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
        storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
        storage.SetFileName(str(sample / "sample_roi.mrk.json"))
        assert storage.ReadData(roi)
    else:
        t1 = volumes.AddArchetypeVolume(
            str(write_volume(tmp_path / "t1.nii.gz", shape=(40, 64, 64), spacing=(1.5, 1.5, 3.0))), "T1", 0
        )
        t2 = volumes.AddArchetypeVolume(
            str(write_volume(tmp_path / "t2.nii.gz", shape=(40, 64, 64), spacing=(1.5, 1.5, 3.0), seed=3)),
            "T2",
            0,
        )
        roi = ClassifierLogic().createRoi(size=(60, 60, 45), referenceVolume=t1)
    logic = ClassifierLogic(
        launcher=eng.EngineLauncher(python=sys.executable, module_dir=CLASSIFIER_DIR),
        moduleDir=CLASSIFIER_DIR,
        workRoot=tmp_path / "work",
        resultsRoot=tmp_path / "results",
    )
    assert logic.checkInputs(t1, t2, roi, model_dir) == []
    result = logic.process(t1, t2, roi, model_dir, PredictOptions(device="cpu"), timeout=300)
    assert sum(ClassifierLogic.tableProbabilities(result.tableNode).values()) == pytest.approx(1.0, abs=1e-3)
    rows = _tableRows(result.tableNode)
    assert rows["Computed on"] == f"cpu, {result.prediction['precision']}"  # the engine's device and precision
    for node in (result.heatmapNode, result.labelNode):
        assert node.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(t1))
    assert set(np.unique(slicer.util.arrayFromVolume(result.labelNode)).tolist()) <= {0, 1, 2, 3}
    # the same case through the long-lived worker replaces the outputs
    count = scene_node.GetNumberOfNodes()
    task = logic.prepare(t1, t2, roi, model_dir, PredictOptions(device="cpu", precision="fp32"))
    again = logic.startAsync(task).wait(timeout=300)
    logic.stopWorker()
    assert again.heatmapNode is result.heatmapNode and scene_node.GetNumberOfNodes() == count
    assert _tableRows(again.tableNode)["Computed on"] == "cpu, fp32"  # the "Exact fp32" option reaches the worker


def _real_cv_available() -> bool:
    try:
        import ipmn.cli_train  # noqa: F401
        import ipmn.cv  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _real_cv_available(), reason="ipmn cv cannot be imported yet")
def test_trainer_end_to_end_real_cv(scene, tmp_path, phantom_cohort):
    """The real ``ipmn cv`` (2 outer x 2 inner folds, 1-layer ViT, 1 epoch) driven by the trainer logic.

    ``phantom_cohort`` (12 phantom cases) comes from the shared Testing/conftest.py.
    """
    manifest = phantom_cohort
    demo = (CLASSIFIER_DIR / "ipmn" / "presets" / "demo.yaml").read_text()
    base = tmp_path / "base.yaml"
    base.write_text(
        demo.replace("depth: 4", "depth: 1")
        .replace("windows_per_case: 2", "windows_per_case: 1")
        .replace("n4: true", "n4: false")
        .replace("smoothing: curvature", "smoothing: none")
        .replace("temperature: true", "temperature: true\n  examples: 0")
    )
    # ``ipmn cv`` through the CLI module (in case it is not wired into ``python -m ipmn`` yet)
    code = "import sys; from ipmn.cli_train import main; sys.exit(main(sys.argv[1:]))"
    logic = TrainerLogic(
        launcher=eng.EngineLauncher(module_dir=CLASSIFIER_DIR, command_prefix=[sys.executable, "-c", code])
    )
    logic.modelsDir = tmp_path / "models"
    options = TrainingOptions(
        cohort=manifest,
        output=tmp_path / "run",
        kind="cv",
        config=base,
        models=["vit_tiny"],
        outer=2,
        inner=2,
        epochs=1,
        lr=5e-4,
        batchSize=8,
        device="cpu",
    )
    curves = LearningCurves()
    items = []
    run = logic.start(options, curves)
    done = run.wait(onItem=items.append, timeout=600)
    run.cleanup()
    assert done["out"] == str(tmp_path / "run")
    progress = [p for kind, p in items if kind == "progress"]
    assert progress[-1]["overallFraction"] == pytest.approx(1.0) and progress[-1]["foldsDone"] == 2
    assert len(curves.tables) == 2 * 3  # per outer fold: 2 inner trainings + the final one
    results = logic.resultsTable(tmp_path / "run")
    names = [results.GetTable().GetColumn(0).GetValue(r) for r in range(results.GetNumberOfRows())]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"} <= set(names)
    infos = logic.registerTrainedModel(tmp_path / "run", "cv", "real cv")
    assert len(infos) == 1 and infos[0].valid and len(infos[0].members) == 2
