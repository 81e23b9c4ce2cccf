"""DICOM in (series choice) and out (SEG + SR): written by pydicom here, read back with highdicom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dicom_phantom import PATIENT_ID, PATIENT_NAME, write_dicom_series

from conftest import run_cli
from ipmn.errors import IPMNError
from ipmn.io import read_volume
from ipmn.models import build_model, save_package
from ipmn.phantoms import make_case, write_case

TINY = {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study folder holding a T1 and a T2 series (different sizes), plus the NIfTI originals."""
    base = tmp_path_factory.mktemp("dicom")
    case = make_case(5, 1, t1_shape=(96, 96, 30), t2_shape=(80, 80, 24), t1_orientation="RAS",
                     t2_orientation="PLS")
    nii = write_case(case, base / "nii", "c")
    t1 = write_dicom_series(case["t1"], base / "study", "T1 VIBE", series_number=3, prefix="t1_")
    t2 = write_dicom_series(case["t2"], base / "study", "T2 HASTE", study_uid=t1["study_uid"], series_number=4,
                            prefix="t2_")
    torch.manual_seed(0)
    save_package(base / "model", build_model(TINY), {**TINY, "name": "tiny-test", "id": "tiny-test-v3",
                                                      "preprocess": {"n4": False, "smoothing": "none"}})
    return {"folder": base / "study", "t1": t1, "t2": t2, "nii": nii, "model": base / "model", "case": case}


def test_series_read_equals_the_nifti_original(study):
    image = read_volume(study["folder"], "T1", series=study["t1"]["series_uid"])
    reference = sitk.ReadImage(str(study["nii"]["t1"]))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert read_volume(study["folder"], "T2", series=study["t2"]["series_uid"]).GetSize() == (80, 80, 24)


def test_folder_with_two_series_needs_a_choice(study):
    with pytest.raises(IPMNError) as err:
        read_volume(study["folder"], "T2")
    msg = str(err.value)
    assert "--t2-series" in msg and "2 DICOM series" in msg
    for uid, desc, n in ((study["t1"]["series_uid"], "T1 VIBE", 30), (study["t2"]["series_uid"], "T2 HASTE", 24)):
        assert f"{uid} ('{desc}', {n} files)" in msg
    with pytest.raises(IPMNError, match="no series 1.2.3 in"):
        read_volume(study["folder"], "T1", series="1.2.3")
    with pytest.raises(IPMNError, match="not a DICOM folder"):
        read_volume(study["nii"]["t1"], "T1", series=study["t1"]["series_uid"])


def test_dicom_out_needs_a_dicom_t1_before_the_model_loads(study, tmp_path):
    proc = run_cli("predict", "--t1", study["nii"]["t1"], "--t2", study["nii"]["t2"], "--roi", study["nii"]["roi"],
                   "--model", tmp_path / "no-such-model", "--out", tmp_path / "o", "--dicom-out", tmp_path / "d")
    assert proc.returncode == 2 and proc.stderr.startswith("ipmn: error: --dicom-out needs --t1 to be a DICOM")
    proc = run_cli("predict", "--t1", study["folder"], "--t2", study["nii"]["t2"], "--roi", study["nii"]["roi"],
                   "--model", study["model"], "--out", tmp_path / "o", "--device", "cpu")
    assert proc.returncode == 2 and "choose one with --t1-series" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def _frame_geometry(ds):
    return (np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float),
            np.array(ds.PixelSpacing, float))


def _text_values(dataset) -> list[str]:
    found = []
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                found += _text_values(item)
        elif element.keyword == "TextValue":
            found.append(str(element.value))
    return found


def test_predict_dicom_in_and_out(study, tmp_path):
    import highdicom as hd
    import pydicom

    out, dcm = tmp_path / "out", tmp_path / "dicom"
    proc = run_cli("predict", "--t1", study["folder"], "--t1-series", study["t1"]["series_uid"],
                   "--t2", study["folder"], "--t2-series", study["t2"]["series_uid"], "--roi", study["nii"]["roi"],
                   "--model", study["model"], "--out", out, "--dicom-out", dcm, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    prediction = json.loads((out / "prediction.json").read_text())
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in study["t1"]["files"]}

    # --- SEG: one frame per segment and T1 image, each with that image's geometry and reference
    seg = hd.seg.segread(dcm / prediction["dicom"]["seg"])
    assert seg.number_of_segments == 3 and int(seg.NumberOfFrames) == 3 * len(sources)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f"top {v}% attention" for v in (20, 10, 5)]
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in seg.SegmentSequence)
    spacing = np.array(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, float)
    orientation = np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                           float)
    assert (seg.Rows, seg.Columns) == (96, 96)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position, src_orientation, src_spacing = _frame_geometry(sources[uid])
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient, position, atol=1e-3)
        np.testing.assert_allclose(orientation, src_orientation, atol=1e-6)
        np.testing.assert_allclose(spacing, src_spacing, atol=1e-6)
    # segment n = voxels labelled >= n in attention_labels.nii.gz (the NIfTI output is the reference)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention_labels.nii.gz")))
    ordered = [pydicom.dcmread(f).SOPInstanceUID for f in study["t1"]["files"]]
    for number in (1, 2, 3):
        volume = seg.get_pixels_by_source_instance(source_sop_instance_uids=ordered, segment_numbers=[number])
        np.testing.assert_array_equal(volume[..., 0] > 0, labels >= number)
    assert (labels == 3).any()

    # --- SR: the numbers of prediction.json, the model's identity, references to SEG and T1 series
    sr = hd.sr.srread(dcm / prediction["dicom"]["sr"])
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    for cls, p in prediction["probabilities"].items():
        assert values[f"Probability of {cls}"] == pytest.approx(p, abs=1e-12)
    assert values["Normalised predictive entropy"] == pytest.approx(prediction["uncertainty"]["entropy"], abs=1e-12)
    grade = group.get_qualitative_evaluations()[0]
    assert grade.value.meaning == prediction["predicted_class"]
    ref = group.referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
    assert ref.source_series_for_segmentation.value == study["t1"]["series_uid"]
    texts = _text_values(sr)
    assert "tiny-test" in texts and any(t.startswith("tiny-test-v3") for t in texts)  # name, version

    # --- patient/study from the source, new UIDs, nothing else copied
    for ds in (seg, sr):
        assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
        assert ds.StudyInstanceUID == study["t1"]["study_uid"]
        assert ds.SeriesInstanceUID not in (study["t1"]["series_uid"], study["t2"]["series_uid"])
        assert ds.SOPInstanceUID not in sources and ds.Manufacturer != "Phantom"
        assert ds.SeriesDescription not in ("T1 VIBE", "T2 HASTE")
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID

    # --- JSON outputs carry no patient name or DICOM identifier
    text = (out / "prediction.json").read_text() + proc.stdout
    for secret in (*PATIENT_NAME.split("^"), PATIENT_ID, study["t1"]["study_uid"], study["t1"]["series_uid"],
                   study["t2"]["series_uid"], seg.SOPInstanceUID, sr.SOPInstanceUID, *list(sources)[:3]):
        assert secret not in text


def test_cohort_series_columns_reach_the_cache(study, tmp_path):
    from ipmn.cache import GridCache
    from ipmn.cohort import load_cohort
    from ipmn.preprocess import PreprocessConfig

    folder, roi = study["folder"], study["nii"]["roi"]
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("case_id,t1,t2,roi,label,t1_series,t2_series\n"
                        f"a,{folder},{folder},{roi},low,{study['t1']['series_uid']},{study['t2']['series_uid']}\n"
                        f"b,{folder},{folder},{roi},low,,\n")
    chosen, unchosen = load_cohort(manifest, ("t1", "t2"))
    cache = GridCache(PreprocessConfig.from_dict({"n4": False, "smoothing": "none"}), ("t1", "t2"),
                      cache_dir=tmp_path / "cache")
    assert cache.key(chosen) != cache.key(unchosen)
    assert cache._build(chosen).data.shape[0] == 2
    with pytest.raises(IPMNError, match="choose one with --t1-series"):
        cache._build(unchosen)


def test_worker_takes_the_dicom_keys_slicer_sends(study, tmp_path):
    """The request of IPMNClassifierLib (t1 = a series folder, t1_series, dicom_out) through ``ipmn worker``."""
    import highdicom as hd

    request = {"cmd": "predict", "t1": str(study["folder"]), "t1_series": study["t1"]["series_uid"],
               "t2": str(study["nii"]["t2"]), "roi": str(study["nii"]["roi"]), "model": str(study["model"]),
               "out": str(tmp_path / "out"), "device": "cpu", "dicom_out": str(tmp_path / "dicom")}
    proc = run_cli("worker", input=json.dumps(request) + "\n" + json.dumps({"cmd": "quit"}) + "\n")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    done = [e for e in events if e["event"] in ("done", "error")]
    assert [e["event"] for e in done] == ["done"], done
    assert done[0]["prediction"]["dicom"] == {"folder": str(tmp_path / "dicom"), "seg": "attention_seg.dcm",
                                              "sr": "grade_sr.dcm"}
    seg = hd.seg.segread(tmp_path / "dicom" / "attention_seg.dcm")
    assert seg.StudyInstanceUID == study["t1"]["study_uid"] and seg.number_of_segments == 3
