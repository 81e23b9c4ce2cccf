"""DICOM out from the IPMN Classifier panel's logic (slicer-core MRML, no Qt): the request carries ``dicom_out``
only for a T1 loaded from DICOM, with that series' own files; otherwise the reason the control is disabled."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import SimpleITK as sitk
from conftest_slicer import CLASSIFIER_DIR, fake_launcher, fake_package, make_scene, write_volume  # noqa: F401
from dicom_phantom import write_dicom_series

slicer = pytest.importorskip("slicer")

from ipmn.errors import IPMNError  # noqa: E402
from IPMNClassifierLib import dicomout  # noqa: E402
from IPMNClassifierLib.logic import ClassifierLogic, PredictOptions  # noqa: E402


def _load_as_dicom_module_does(scene, volumes, series, withSubjectHierarchy=True):
    """Load a series folder and record it as Slicer's DICOM plugins do (SH series UIDs, DICOM.instanceUIDs)."""
    import pydicom

    node = volumes.AddArchetypeVolume(str(series["files"][0]), "T1 VIBE", 0)
    uids = " ".join(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series["files"])
    node.SetAttribute("DICOM.instanceUIDs", uids)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Doe^Jane"), "MR abdomen")
    item = sh.CreateItem(study, node)
    if withSubjectHierarchy:
        constants = slicer.vtkMRMLSubjectHierarchyConstants
        sh.SetItemUID(item, constants.GetDICOMUIDName(), series["series_uid"])
        sh.SetItemUID(item, constants.GetDICOMInstanceUIDName(), uids)
    return node, dict(zip(uids.split(), map(str, series["files"]), strict=True))


@pytest.fixture
def dicom_case(tmp_path, monkeypatch):
    scene, volumes = make_scene(monkeypatch)
    image = sitk.GetImageFromArray(np.random.default_rng(3).integers(0, 800, (14, 40, 48)).astype(np.int16))
    image.SetSpacing((0.9, 0.8, 4.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    t1 = write_dicom_series(image, tmp_path / "db" / "t1", "T1 VIBE")
    # the database folder of the study also holds another series: only T1's files may reach the engine
    other = write_dicom_series(image, tmp_path / "db" / "t1", "T1 repeat", study_uid=t1["study_uid"], prefix="x_")
    single = tmp_path / "single"  # the loader reads a folder: give it T1's files only
    single.mkdir()
    for f in t1["files"]:
        (single / f.name).write_bytes(f.read_bytes())
    t1_node, lookup = _load_as_dicom_module_does(scene, volumes, {**t1, "files": sorted(single.iterdir())})
    t2_node = volumes.AddArchetypeVolume(str(write_volume(tmp_path / "t2.nii.gz", shape=(20, 30, 36),
                                                          spacing=(1.2, 1.1, 3.0), origin=(8.0, -22.0, 28.0))), "T2", 0)
    bounds = [0.0] * 6
    t1_node.GetRASBounds(bounds)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*[(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
    roi.SetSize(24.0, 20.0, 44.0)
    logic = ClassifierLogic(launcher=fake_launcher(tmp_path), moduleDir=CLASSIFIER_DIR, workRoot=tmp_path / "work",
                            resultsRoot=tmp_path / "results")
    logic.fileForInstance = lookup.get
    return {"scene": scene, "volumes": volumes, "t1": t1_node, "t2": t2_node, "roi": roi, "logic": logic,
            "series": t1, "other": other, "files": [lookup[u] for u in lookup], "tmp": tmp_path,
            "model": fake_package(tmp_path / "models" / "tiny", name="Tiny")}


def test_request_carries_dicom_out_and_the_series_only_for_a_dicom_t1(dicom_case):
    c = dicom_case
    out = c["tmp"] / "pacs"
    assert dicomout.unavailableReason(c["t1"], c["logic"].fileForInstance) == ""
    task = c["logic"].prepare(c["t1"], c["t2"], c["roi"], c["model"],
                              PredictOptions(device="cpu", dicomOutDir=str(out)))
    try:
        request = task.workerRequest()
        assert request["dicom_out"] == str(out / "T1_VIBE")
        assert request["t1_series"] == c["series"]["series_uid"]
        staged = sorted(task.t1Path.iterdir())  # T1's own files, byte for byte, none of the other series
        assert request["t1"] == str(task.t1Path) and len(staged) == len(c["files"]) == 14
        assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(staged, c["files"], strict=True))
        args = task.predictArgs()
        assert args[args.index("--t1") + 1] == str(task.t1Path)
        assert args[args.index("--t1-series") + 1] == c["series"]["series_uid"]
        assert args[args.index("--dicom-out") + 1] == str(out / "T1_VIBE")
    finally:
        c["logic"].cleanup(task)
    plain = c["logic"].prepare(c["t1"], c["t2"], c["roi"], c["model"], PredictOptions(device="cpu"))
    try:  # without the option: the volume as NRRD, no DICOM keys at all
        assert plain.t1Path.suffix == ".nrrd"
        assert not {"dicom_out", "t1_series"} & set(plain.workerRequest())
        assert "--dicom-out" not in plain.predictArgs() and "--t1-series" not in plain.predictArgs()
    finally:
        c["logic"].cleanup(plain)


def test_not_dicom_explains_why_and_nothing_is_written(dicom_case):
    c = dicom_case
    options = PredictOptions(device="cpu", dicomOutDir=str(c["tmp"] / "pacs"))
    reason = dicomout.unavailableReason(c["t2"], c["logic"].fileForInstance)
    assert "'T2' was not loaded from DICOM" in reason
    with pytest.raises(IPMNError, match="was not loaded from DICOM"):
        c["logic"].prepare(c["t2"], c["t1"], c["roi"], c["model"], options)  # T2's node given as T1
    assert not list((c["tmp"] / "work").glob("IPMN-*"))  # refused before a temporary folder exists
    assert "select the T1 volume" in dicomout.unavailableReason(None)
    # no DICOM database (slicer-core has none; in Slicer: not open)
    assert "DICOM database is not open" in dicomout.unavailableReason(c["t1"])
    # a file the database no longer has
    missing = dict(zip(dicomout.instanceUIDs(c["t1"]), c["files"], strict=True))
    missing[next(iter(missing))] = str(c["tmp"] / "gone.dcm")
    assert "no longer holds" in dicomout.unavailableReason(c["t1"], missing.get)


def test_t1_moved_or_cropped_is_refused(dicom_case):
    c = dicom_case
    lookup = c["logic"].fileForInstance
    origin = list(c["t1"].GetOrigin())
    c["t1"].SetOrigin(origin[0] + 5.0, origin[1], origin[2])  # as a hardened translation does
    assert "was moved" in dicomout.unavailableReason(c["t1"], lookup)
    c["t1"].SetOrigin(*origin)
    assert dicomout.unavailableReason(c["t1"], lookup) == ""
    array = slicer.util.arrayFromVolume(c["t1"])
    cropped = slicer.util.addVolumeFromArray(array[2:].copy(), name="cropped")
    cropped.CopyOrientation(c["t1"])
    cropped.SetAttribute("DICOM.instanceUIDs", c["t1"].GetAttribute("DICOM.instanceUIDs"))
    assert "no longer its DICOM series' grid" in dicomout.unavailableReason(cropped, lookup)


def test_series_uid_is_optional_the_attribute_is_enough(dicom_case, tmp_path, monkeypatch):
    c = dicom_case
    scene, volumes = make_scene(monkeypatch)
    node, lookup = _load_as_dicom_module_does(scene, volumes, {**c["series"], "files": c["files"]},
                                              withSubjectHierarchy=False)
    source = dicomout.dicomSource(node, lookup.get)
    assert source.seriesUID == "" and [str(f) for f in source.files] == c["files"]


@pytest.mark.parametrize("keepEngineLoaded", [True, False])
def test_dicom_out_reaches_the_engine_and_results_load(dicom_case, keepEngineLoaded):
    """Through the worker and the one-shot command (the stand-in engine echoes what it was given)."""
    c = dicom_case
    out = c["tmp"] / "pacs"
    task = c["logic"].prepare(c["t1"], c["t2"], c["roi"], c["model"],
                              PredictOptions(device="cpu", dicomOutDir=str(out)))
    try:
        result = c["logic"].startAsync(task, keepEngineLoaded=keepEngineLoaded).wait(timeout=60)
    finally:
        c["logic"].stopWorker(block=True)
    args = result.prediction["args"]
    assert args["dicom_out"] == str(out / "T1_VIBE") and args["t1_series"] == c["series"]["series_uid"]
    assert args["t1"].endswith(dicomout.STAGED_FOLDER)
    assert result.heatmapNode.GetImageData().GetDimensions() == c["t1"].GetImageData().GetDimensions()
    assert not task.workDir.exists()  # the staged copy goes with the temporary folder
