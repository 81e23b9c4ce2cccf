"""DICOM out with either pydicom: which highdicom the Slicer installer picks, and a SEG + SR written and read
back without torch (so it also runs in a bare environment with Slicer 5.10's pydicom 2.4.4 + highdicom 0.22.0:
``python -m pytest Testing/test_dicom_compat.py`` there)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import SimpleITK as sitk
from conftest_slicer import CLASSIFIER_DIR  # noqa: F401 - puts the module folders on sys.path
from dicom_phantom import PATIENT_NAME, write_dicom_series

from ipmn.dicom_compat import compatibility_problem, highdicom_requirement, version_tuple

pytest.importorskip("highdicom")


@pytest.mark.parametrize("pydicom, wanted", [
    ("3.0.2", "highdicom>=0.25"),  # Slicer 5.12, and the engine's own environment
    ("3.1.0rc1", "highdicom>=0.25"),
    ("2.4.4", "highdicom>=0.22,<0.23"),  # Slicer 5.8 and 5.10
    ("2.3.1", "highdicom>=0.22,<0.23"),
    ("2.4.0", None),  # highdicom 0.22 excludes it: no release fits
    ("2.2.2", None),
    ("", None),
])
def test_highdicom_fitted_to_pydicom(pydicom, wanted):
    assert highdicom_requirement(pydicom) == wanted


def test_compatibility_problem_names_the_pair():
    assert compatibility_problem("2.4.4", "0.22.0") is None
    assert compatibility_problem("3.0.2", "0.27.0") is None
    assert "needs highdicom>=0.22,<0.23; found highdicom 0.28.2" in compatibility_problem("2.4.4", "0.28.2")
    assert "needs highdicom>=0.25; found highdicom 0.22.0" in compatibility_problem("3.0.2", "0.22.0")
    assert "highdicom is not installed" in compatibility_problem("3.0.2", None)
    assert "found pydicom 2.4.0" in compatibility_problem("2.4.0", "0.22.0")
    assert version_tuple("0.22.0") == (0, 22, 0) and version_tuple("3.0.0rc1") == (3, 0, 0)


def test_installer_fits_highdicom_and_never_lists_pydicom():
    from IPMNClassifierLib import dependencies

    lines = dependencies.readRequirements(CLASSIFIER_DIR / "Resources" / "requirements.txt")
    for pydicom, wanted in (("2.4.4", "highdicom>=0.22,<0.23"), ("3.0.2", "highdicom>=0.25")):
        adapted = dependencies.adaptRequirements(lines, pydicom)
        assert [a for a in adapted if a.startswith("highdicom")] == [wanted]
        assert len(adapted) == len(lines) and not any(a.lower().startswith("pydicom") for a in adapted)
        assert [a for a in adapted if not a.startswith("highdicom")] == [x for x in lines if not x.startswith("highdicom")]
    assert not any(a.startswith("highdicom") for a in dependencies.adaptRequirements(lines, "2.4.0"))
    # without a version: the installed pydicom decides (never replaced: it is pinned in the constraints)
    here = importlib.metadata.version("pydicom")
    assert dependencies.adaptRequirements(lines) == dependencies.adaptRequirements(lines, here)


def test_seg_and_sr_round_trip_with_the_installed_pair(tmp_path):
    """The pair installed here writes a SEG on the source frames and an SR with the given numbers."""
    import highdicom as hd
    import pydicom

    from ipmn import dicom_out

    pair = (importlib.metadata.version("pydicom"), importlib.metadata.version("highdicom"))
    assert compatibility_problem(*pair) is None, pair
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 500, (12, 32, 40)).astype(np.int16))
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetOrigin((10.0, -5.0, 20.0))
    series = write_dicom_series(image, tmp_path / "t1", "T1 VIBE")
    labels = np.zeros((12, 32, 40), np.uint8)
    labels[4:8, 10:20, 10:25] = 1
    labels[5:7, 12:16, 12:18] = 2
    labels[6, 13, 14] = 3
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    result = {"model": {"name": "tiny", "id": "tiny-v1"}, "classes": ["normal", "low", "high"],
              "probabilities": {"normal": 0.2, "low": 0.3, "high": 0.5}, "uncertainty": {"entropy": 0.9},
              "predicted_class": "high"}
    dicom_out.check_dicom_out(tmp_path / "t1", ("t1", "t2"))
    names = dicom_out.write_dicom_outputs(tmp_path / "out", tmp_path / "t1", None, label_image, result, (20, 10, 5))

    seg = hd.seg.segread(tmp_path / "out" / names["seg"])
    ordered = [pydicom.dcmread(f).SOPInstanceUID for f in series["files"]]
    assert int(seg.NumberOfFrames) == 3 * 12 and seg.number_of_segments == 3
    for number in (1, 2, 3):
        volume = seg.get_pixels_by_source_instance(source_sop_instance_uids=ordered, segment_numbers=[number])
        np.testing.assert_array_equal(volume[..., 0] > 0, labels >= number)
    sr = hd.sr.srread(tmp_path / "out" / names["sr"])
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    assert values == {"Probability of normal": 0.2, "Probability of low": 0.3, "Probability of high": 0.5,
                      "Normalised predictive entropy": 0.9}
    assert group.get_qualitative_evaluations()[0].value.meaning == "high"
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    for ds in (seg, sr):
        assert str(ds.PatientName) == PATIENT_NAME and ds.StudyInstanceUID == series["study_uid"]
        assert ds.file_meta.TransferSyntaxUID  # written as a DICOM file (preamble + meta), with either pydicom
