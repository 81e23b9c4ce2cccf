"""The bad-input and fault campaign of issue 15 kept as a corpus: every case with its expected outcome.

Inputs are made here from the bundled sample case and demo model (truncated, NaN-laden, sheared,
colour, mis-typed ...). The command line runs in-process (``ipmn.cli.main``), and every input is
checked before the model is loaded, so most cases take milliseconds. Outcomes:

* ``Err(needles)``: exit status 2, exactly one ``ipmn: error:`` line holding every needle, no
  traceback, no "internal error", no ``prediction.json`` written;
* ``Usage(needle)``: argparse refuses the value (exit 2, its ``error:`` line);
* the few cases that must succeed (with a recorded warning) run the real demo model.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from ipmn.cli import main

SAMPLE = REPO / "Resources" / "SampleData"
DEMO = REPO / "Resources" / "DemoModel"
ROI_RAS = (-9.8295, -7.2734, 6.2412)  # the sample ROI's centre: on the patient's right (R < 0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ inputs
def _image(arr, like: sitk.Image | None = None, spacing=(1.0, 1.0, 2.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    if like is not None:
        img.CopyInformation(like)
    else:
        img.SetSpacing(spacing)
    return img


def _edit_header(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    head, sep, rest = data.partition(old)
    assert sep, (old, data[:400])
    path.write_bytes(head + new + rest)
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """Every broken input of the corpus, made once from the sample case."""
    d = tmp_path_factory.mktemp("bad_inputs")
    t1 = sitk.ReadImage(str(SAMPLE / "sample_t1.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(t1)
    raw = (SAMPLE / "sample_t1.nii.gz").read_bytes()
    f = {"dir": d}
    f["trunc200"] = d / "trunc200.nii.gz"
    f["trunc200"].write_bytes(raw[:200])
    f["trunc_half"] = d / "trunc_half.nii.gz"
    f["trunc_half"].write_bytes(raw[: len(raw) // 2])
    mask_raw = (SAMPLE / "sample_pancreas.nii.gz").read_bytes()
    f["trunc_mask"] = d / "trunc_mask.nii.gz"
    f["trunc_mask"].write_bytes(mask_raw[: len(mask_raw) // 2])
    plain = gzip.decompress(raw)
    f["trunc_plain"] = d / "trunc_plain.nii"
    f["trunc_plain"].write_bytes(plain[: len(plain) * 3 // 4])
    nan = arr.copy()
    nan[20, 90:95, 90] = np.nan
    nan[21, 50, 50] = np.inf
    f["nan_nii"] = d / "nan.nii.gz"
    sitk.WriteImage(_image(nan, t1), str(f["nan_nii"]))
    f["all_nan_nii"] = d / "all_nan.nii.gz"
    sitk.WriteImage(_image(np.full_like(arr, np.nan), t1), str(f["all_nan_nii"]))
    f["tiny_range"] = d / "tiny_range.nii.gz"
    sitk.WriteImage(_image((arr / arr.max() * 1e-30).astype(np.float32), t1), str(f["tiny_range"]))
    # sheared direction matrices, written into otherwise valid headers
    small = _image(np.random.default_rng(0).random((8, 10, 12)).astype(np.float32), spacing=(1.0, 1.0, 3.0))
    f["shear_nrrd"] = d / "shear.nrrd"
    sitk.WriteImage(small, str(f["shear_nrrd"]))
    _edit_header(f["shear_nrrd"], b"(0,1,0)", b"(0.5,1,0)")
    f["shear_mha"] = d / "shear.mha"
    sitk.WriteImage(small, str(f["shear_mha"]))
    _edit_header(f["shear_mha"], b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1")
    rotated = sitk.Image(small)
    c, s = np.cos(0.3), np.sin(0.3)
    rotated.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    f["oblique_nrrd"] = d / "oblique.nrrd"  # oblique but orthogonal: valid
    sitk.WriteImage(rotated, str(f["oblique_nrrd"]))
    # a colour volume given as a mask
    rgb = np.stack([np.full(arr.shape, v, np.uint8) for v in (10, 200, 30)], axis=-1)
    rgb_img = sitk.GetImageFromArray(rgb, isVector=True)
    rgb_img.CopyInformation(t1)
    f["rgb_mask"] = d / "rgb_mask.nrrd"
    sitk.WriteImage(rgb_img, str(f["rgb_mask"]))
    # files in the way of --out
    f["a_file"] = d / "a_file.txt"
    f["a_file"].write_text("not a folder")
    f["dangling"] = d / "dangling"
    f["dangling"].symlink_to(d / "no-such-target")
    f["latin1_yaml"] = d / "latin1.yaml"
    f["shrink0_yaml"] = d / "shrink0.yaml"
    f["shrink0_yaml"].write_text("preprocess:\n  n4_shrink: 0\n")
    f["margin_yaml"] = d / "margin.yaml"
    f["margin_yaml"].write_text("data:\n  roi_margin_mm: 10000000.0\n")
    f["latin1_yaml"].write_bytes("preprocess:\n  n4: false  # r\xe9sum\xe9\n".encode("latin-1"))
    return f


def _model_with(tmp: Path, name: str, **preprocess) -> Path:
    """The demo model with some preprocessing values changed in its config.json (weights linked)."""
    folder = tmp / name
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(DEMO / "model.safetensors")
    config = json.loads((DEMO / "config.json").read_text())
    config["preprocess"].update(preprocess)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------------ runner
def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc, err, *needles, out_dir: Path | None = None):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ipmn: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    if out_dir is not None:
        assert not (Path(out_dir) / "prediction.json").exists()


def predict_argv(out, t1=SAMPLE / "sample_t1.nii.gz", t2=SAMPLE / "sample_t2.nii.gz",
                 roi=SAMPLE / "sample_roi.mrk.json", model=DEMO, extra=()) -> list:
    argv = ["predict", "--model", model, "--out", out, "--device", "cpu", "--precision", "fp32"]
    for flag, value in (("--t1", t1), ("--t2", t2), ("--roi", roi)):
        if value is not None:
            argv += [flag, value]
    return argv + list(extra)


@dataclass(frozen=True)
class Err:
    needles: tuple


@dataclass(frozen=True)
class Usage:
    needle: str


# (id, issue item, argv from (bad files, tmp folder), expected outcome)
CORPUS = [
    ("truncated-200-bytes", 5, lambda f, o: predict_argv(o, t1=f["trunc200"]), Err(("T1", "truncated"))),
    ("truncated-half", 5, lambda f, o: predict_argv(o, t2=f["trunc_half"]), Err(("T2", "truncated"))),
    ("truncated-uncompressed", 5, lambda f, o: predict_argv(o, t1=f["trunc_plain"]), Err(("T1", "truncated"))),
    ("truncated-mask", 5, lambda f, o: predict_argv(o, roi=None, extra=["--mask", f["trunc_mask"]]),
     Err(("ROI mask", "truncated"))),
    ("nan-in-nifti", 6, lambda f, o: predict_argv(o, t1=f["nan_nii"]), Err(("T1", "6 NaN/Inf voxels"))),
    ("all-nan-nifti", 6, lambda f, o: predict_argv(o, t2=f["all_nan_nii"]), Err(("T2", "NaN/Inf"))),
    ("sheared-nrrd", 8, lambda f, o: predict_argv(o, t1=f["shear_nrrd"]), Err(("T1", "sheared"))),
    ("sheared-mha", 8, lambda f, o: predict_argv(o, t2=f["shear_mha"]), Err(("T2", "sheared"))),
    ("sub-voxel-roi", 9, lambda f, o: predict_argv(o, roi="0,0,0:1e-9,1e-9,55"), Err(("smaller than one T1 voxel",))),
    ("rgb-mask", 9, lambda f, o: predict_argv(o, roi=None, extra=["--mask", f["rgb_mask"]]), Err(("3 components",))),
    ("roi-and-mask", 9, lambda f, o: predict_argv(o, extra=["--mask", SAMPLE / "sample_pancreas.nii.gz"]),
     Err(("not both",))),
    ("tiny-intensity-range", 9, lambda f, o: predict_argv(o, t1=f["tiny_range"]), Err(("T1", "span only"))),
    ("stride-0", 10, lambda f, o: predict_argv(o, extra=["--windows", "all", "--stride", "0"]), Usage("--stride")),
    ("stride-negative", 10, lambda f, o: predict_argv(o, extra=["--stride=-2"]), Usage("--stride")),
    ("grid-cell-0", 10, lambda f, o: ["grid", "--t1", SAMPLE / "sample_t1.nii.gz", "--t2", SAMPLE / "sample_t2.nii.gz",
                                      "--roi", SAMPLE / "sample_roi.mrk.json", "--out", o, "--cell", "0"], Usage("--cell")),
    ("grid-cell-100000", 16, lambda f, o: ["grid", "--t1", SAMPLE / "sample_t1.nii.gz", "--out", o,
                                           "--cell", "100000"], Usage("--cell")),
    ("margin-1e7", 16, lambda f, o: predict_argv(o, roi=None, extra=["--mask", SAMPLE / "sample_pancreas.nii.gz",
                                                                     "--margin", "1e7"]), Err(("--margin",))),
    ("margin-negative", 16, lambda f, o: predict_argv(o, roi=None, extra=["--mask", SAMPLE / "sample_pancreas.nii.gz",
                                                                          "--margin", "-5"]), Err(("--margin",))),
    ("margin-nan", 16, lambda f, o: predict_argv(o, roi=None, extra=["--mask", SAMPLE / "sample_pancreas.nii.gz",
                                                                     "--margin", "nan"]), Err(("--margin",))),
    ("non-utf8-config", 16, lambda f, o: ["grid", "--t1", SAMPLE / "sample_t1.nii.gz", "--t2",
                                          SAMPLE / "sample_t2.nii.gz", "--roi", SAMPLE / "sample_roi.mrk.json",
                                          "--out", o, "--config", f["latin1_yaml"]], Err(("UTF-8",))),
    ("yaml-n4-shrink-0", 11, lambda f, o: ["grid", "--t1", SAMPLE / "sample_t1.nii.gz", "--t2",
                                           SAMPLE / "sample_t2.nii.gz", "--roi", SAMPLE / "sample_roi.mrk.json",
                                           "--out", o, "--config", f["shrink0_yaml"]], Err(("n4_shrink",))),
    ("yaml-roi-margin-1e7", 16, lambda f, o: ["train", "--cohort", o / "never-read.csv", "--out", o / "m",
                                              "--config", f["margin_yaml"]], Err(("roi_margin_mm",))),
    ("path-5000-chars", 16, lambda f, o: predict_argv(o, t1="/tmp/" + "x" * 5000 + ".nii.gz"), Err(("T1",))),
    ("out-is-a-file", 13, lambda f, o: predict_argv(f["a_file"]), Err(("cannot write", "not a folder"))),
    ("out-dev-null", 13, lambda f, o: predict_argv("/dev/null"), Err(("cannot write", "not a folder"))),
    ("out-dangling-link", 13, lambda f, o: predict_argv(f["dangling"]), Err(("cannot write", "dangling"))),
    ("out-under-a-file", 13, lambda f, o: predict_argv(f["a_file"] / "sub" / "out"), Err(("cannot write", "is a file"))),
    ("out-empty", 13, lambda f, o: predict_argv(""), Err(("--out is empty",))),
    ("grid-out-is-a-file", 13, lambda f, o: ["grid", "--t1", SAMPLE / "sample_t1.nii.gz", "--t2",
                                             SAMPLE / "sample_t2.nii.gz", "--roi", SAMPLE / "sample_roi.mrk.json",
                                             "--out", f["a_file"]], Err(("cannot write",))),
    ("demo-out-dev-null", 13, lambda f, o: ["demo", "--out", "/dev/null"], Err(("cannot write",))),
    ("model-negative-margin", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m1", margin_mm=-5.0)),
     Err(("config.json", "margin_mm"))),
    ("model-n4-shrink-0", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m2", n4_shrink=0)),
     Err(("n4_shrink",))),
    ("model-negative-smoothing", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m3",
                                                                                     smoothing_iterations=-3)),
     Err(("smoothing_iterations",))),
    ("model-reversed-percentiles", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m4",
                                                                                       scale_percentiles=[99.5, 0.5])),
     Err(("scale_percentiles",))),
    ("model-empty-n4-iterations", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m5", n4_iterations=[])),
     Err(("n4_iterations",))),
    ("model-zero-conductance", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m6",
                                                                                   smoothing_conductance=0)),
     Err(("smoothing_conductance",))),
    ("model-coverage-2", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m7", min_coverage=2)),
     Err(("min_coverage",))),
    ("model-reference-t3", 11, lambda f, o: predict_argv(o, model=_model_with(o.parent, "m8", reference="t3")),
     Err(("reference",))),
]


@pytest.mark.parametrize("case_id,item,argv,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(bad, tmp_path, capsys, case_id, item, argv, expected):
    out = tmp_path / "out"
    rc, _, err = run(capsys, *argv(bad, out))
    if isinstance(expected, Usage):
        assert rc == 2 and "Traceback" not in err, err
        assert "error:" in err and expected.needle in err, err
    else:
        assert_refused(rc, err, *expected.needles, out_dir=out)
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------ item 6
def test_nan_in_nifti_is_cleaned_to_the_median_not_zero(bad):
    from ipmn.io import read_volume

    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "sample_t1.nii.gz"), sitk.sitkFloat32))
    cleaned = sitk.GetArrayFromImage(read_volume(bad["nan_nii"], "T1", nonfinite="clean"))
    planted = np.zeros(t1.shape, bool)
    planted[20, 90:95, 90] = planted[21, 50, 50] = True
    median = float(np.median(t1[~planted]))
    assert median > 1.0  # the planted voxels must not come back as 0
    np.testing.assert_allclose(cleaned[planted], median, rtol=1e-6)
    np.testing.assert_array_equal(cleaned[~planted], t1[~planted])


def test_oblique_orthogonal_nrrd_is_accepted(bad):
    from ipmn.io import read_volume

    img = read_volume(bad["oblique_nrrd"], "T1")
    assert abs(img.GetDirection()[1] + np.sin(0.3)) < 1e-6


# ------------------------------------------------------------------------------------------------ item 15
def test_roi_on_the_patients_right_is_accepted_as_a_separate_argument(tmp_path):
    from ipmn.cli import _join_negative_values, build_parser
    from ipmn.inputs import load_inputs

    box = f"{ROI_RAS[0]},{ROI_RAS[1]},{ROI_RAS[2]}:150,60,55"
    args = build_parser().parse_args(_join_negative_values(
        ["grid", "--t1", "a.nii", "--roi", box, "--out", str(tmp_path)]))
    assert args.roi == box
    _, roi = load_inputs(SAMPLE / "sample_t1.nii.gz", SAMPLE / "sample_t2.nii.gz", args.roi, None)
    np.testing.assert_allclose(roi.center, ROI_RAS)
    # a value that is an option stays an option
    assert _join_negative_values(["--roi", "--mask", "m"]) == ["--roi", "--mask", "m"]


# ------------------------------------------------------------------------------------------------ item 9
def test_partly_outside_roi_and_unused_t2_are_recorded(tmp_path, capsys):
    """An ROI 1/3 above the top of T1 is graded with a coverage field and a warning; a T2 given to a T1-only
    model is reported as unused."""
    t1 = sitk.ReadImage(str(SAMPLE / "sample_t1.nii.gz"))
    corners = [t1.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, t1.GetSize()[0] - 1)
               for j in (0, t1.GetSize()[1] - 1) for k in (0, t1.GetSize()[2] - 1)]
    top_s = max(c[2] for c in corners)  # the sample T1's last slice (S = LPS z, mm)
    centre_s = top_s + 0.34 * 55 - 55 / 2
    box = f"--roi={ROI_RAS[0]},{ROI_RAS[1]},{centre_s}:150,60,55"
    out = tmp_path / "out"
    rc, _, err = run(capsys, "predict", "--model", DEMO, "--t1", SAMPLE / "sample_t1.nii.gz", "--t2",
                     SAMPLE / "sample_t2.nii.gz", box, "--out", out, "--device", "cpu", "--precision", "fp32")
    assert rc == 0, err
    pred = json.loads((out / "prediction.json").read_text())
    # about a third of the ROI lies above T1's top edge (the grid's slices snap to T1's: 0.69 to 0.75 inside)
    assert 0.62 < pred["roi_coverage"]["t1"] < 0.76, pred["roi_coverage"]
    assert any("outside the T1 volume" in w for w in pred["warnings"]) and "ipmn: warning:" in err

    from ipmn.inputs import case_inputs

    _, _, notes = case_inputs(("t1",), SAMPLE / "sample_t1.nii.gz", SAMPLE / "sample_t2.nii.gz",
                              SAMPLE / "sample_roi.mrk.json")
    assert notes and "T2 is not used" in notes[0]
    _, _, notes = case_inputs(("t1", "t2"), SAMPLE / "sample_t1.nii.gz", SAMPLE / "sample_t2.nii.gz",
                              SAMPLE / "sample_roi.mrk.json")
    assert notes == []


# ------------------------------------------------------------------------------------------------ item 13
def test_full_or_inode_less_file_system_is_refused_up_front(tmp_path, monkeypatch):
    from ipmn.errors import IPMNError
    from ipmn.io import check_out_dir

    real = os.statvfs(tmp_path)
    fields = {k: getattr(real, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                             "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def fake(**over):
        ns = type("statvfs", (), {**fields, **over})
        monkeypatch.setattr(os, "statvfs", lambda p: ns)

    check_out_dir(tmp_path / "new")
    fake(f_bavail=0)
    with pytest.raises(IPMNError, match="is full"):
        check_out_dir(tmp_path / "new")
    fake(f_files=1000, f_favail=0)
    with pytest.raises(IPMNError, match="no free inodes"):
        check_out_dir(tmp_path / "new")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    rc, _, err = run(capsys, *predict_argv(ro / "out"))
    assert_refused(rc, err, "cannot write", "not writable")


def test_train_refuses_a_bad_out_before_training(bad, capsys, tmp_path):
    manifest = tmp_path / "none.csv"  # never read: --out is checked first
    rc, _, err = run(capsys, "train", "--cohort", manifest, "--config", "demo", "--out", bad["a_file"])
    assert_refused(rc, err, "cannot write", "not a folder")
    rc, _, err = run(capsys, "cv", "--cohort", manifest, "--config", "demo", "--out", "/dev/null")
    assert_refused(rc, err, "cannot write")
    assert not (bad["dir"] / "a_file.txt.train").exists()


# ------------------------------------------------------------------------------------------------ item 16
@pytest.mark.parametrize("content", ["[1, 2, 3]", "\"hello\"", "null"])
def test_run_json_that_is_not_an_object(tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(content)
    rc, _, err = run(capsys, "cv", "--out", run_dir, "--resume")
    assert_refused(rc, err, "run.json", "damaged")
    rc, _, err = run(capsys, "cv-report", run_dir)
    assert_refused(rc, err, "run.json", "damaged")
    from ipmn.runs import stored_train_run

    with pytest.raises(Exception, match="damaged"):
        stored_train_run(run_dir)


# ------------------------------------------------------------------------------------------------ item 17
def test_an_input_error_is_reported_before_torch_is_imported():
    import ipmn

    code = ("import sys; from ipmn.cli import main; "
            f"rc = main(['predict', '--model', {str(DEMO)!r}, '--t1', '/nope.nii.gz', '--t2', '/nope.nii.gz', "
            f"'--roi', {str(SAMPLE / 'sample_roi.mrk.json')!r}, '--out', '/tmp/ipmn-never-written']); "
            "print(rc, 'torch' in sys.modules)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(ipmn.__file__).resolve().parents[1])})
    elapsed = time.perf_counter() - t0
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr)
    assert "T1: file not found" in proc.stderr
    assert elapsed < 20  # generous on a loaded machine; the point is that torch is never imported


# ------------------------------------------------------------------------------------------------ item 12
def _manifest(tmp_path, rows) -> Path:
    lines = ["case_id,t1,t2,roi,label,patient_id"]
    for cid, label, pid in rows:
        lines.append(f"{cid},{SAMPLE / 'sample_t1.nii.gz'},{SAMPLE / 'sample_t2.nii.gz'},"
                     f"{SAMPLE / 'sample_roi.mrk.json'},{label},{pid}")
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_one_patient_with_two_labels_is_refused(tmp_path, capsys):
    rc, _, err = run(capsys, "cohort", _manifest(tmp_path, [("a", "low", "p1"), ("b", "high", "p1"),
                                                            ("c", "low", "p2"), ("d", "low", "p2")]))
    assert_refused(rc, err, "1 problem", "patient 'p1'", "different labels")
    rc, out, err = run(capsys, "cohort", _manifest(tmp_path, [("a", "low", "p1"), ("b", "low", "p1")]))
    assert rc == 0, err


# ------------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("case_id", ["../../escape", "/abs/path", "back\\slash", "nul\x00byte", "tab\tid", "a..b"])
def test_case_ids_that_are_paths_are_refused(tmp_path, capsys, case_id):
    rc, _, err = run(capsys, "cohort", _manifest(tmp_path, [(case_id, "low", "p1"), ("ok", "high", "p2")]))
    assert_refused(rc, err, "case_id", "1 problem")


def test_cystx_folder_case_ids_are_checked(tmp_path):
    from ipmn.cohort import load_cystx
    from ipmn.errors import IPMNError

    (tmp_path / "labels.csv").write_text("case_id,label\n../x,low\n")
    with pytest.raises(IPMNError, match="path separator"):
        load_cystx(tmp_path)


# ------------------------------------------------------------------------------------------------ item 14
def test_worker_answers_every_line_and_keeps_serving(bad, tmp_path):
    import io

    from ipmn.predict import serve

    good = {"cmd": "predict", "t1": str(SAMPLE / "sample_t1.nii.gz"), "t2": str(SAMPLE / "sample_t2.nii.gz"),
            "roi": str(SAMPLE / "sample_roi.mrk.json"), "model": str(DEMO), "device": "cpu", "precision": "fp32"}
    lines = ["[1, 2, 3]", "\"hello\"", "null", "42",
             json.dumps({**good, "out": str(tmp_path / "a"), "tta": "false"}),
             json.dumps({**good, "out": 5}),
             json.dumps({**good, "out": str(bad["a_file"])}),
             json.dumps({**good, "out": str(tmp_path / "b"), "stride": 0, "windows": "all"}),
             json.dumps({**good, "out": str(tmp_path / "c"), "tta": False}),
             json.dumps({"cmd": "quit"})]
    stdout = io.StringIO()
    assert serve(io.StringIO("\n".join(lines) + "\n"), stdout) == 0
    events = [json.loads(x) for x in stdout.getvalue().splitlines()]
    answers = [e for e in events if e["event"] in ("done", "error", "bye")]
    assert [e["event"] for e in answers] == ["error"] * 8 + ["done", "bye"], answers
    messages = [e["message"] for e in answers[:8]]
    assert all("internal error" not in m for m in messages), messages
    assert "JSON object" in messages[0] and "'tta' must be true or false" in messages[4]
    assert "'out' must be a string" in messages[5] and "cannot write" in messages[6] and "stride" in messages[7]
    assert not (tmp_path / "a").exists() and (tmp_path / "c" / "prediction.json").exists()


# ------------------------------------------------------------------------------------------------ item 3
def _predict_into(out, roi=SAMPLE / "sample_roi.mrk.json"):
    from ipmn.predict import Predictor

    return Predictor(DEMO, device="cpu", precision="fp32").predict(
        t1=SAMPLE / "sample_t1.nii.gz", t2=SAMPLE / "sample_t2.nii.gz", roi=roi, out=out)


def _consistent(out: Path) -> bool:
    """prediction.json present ⇒ every output it names has the SHA-256 it records."""
    from ipmn.vocab import sha256_file

    if not (out / "prediction.json").exists():
        return True
    recorded = json.loads((out / "prediction.json").read_text()).get("output_sha256") or {}
    names = ("attention.nii.gz", "attention_labels.nii.gz", "grid.png")
    return bool(recorded) and all(sha256_file(out / n) == recorded.get(n) for n in names)


def test_outputs_commit_as_one_unit_and_stale_staging_goes(tmp_path, monkeypatch):
    import ipmn.predict as predict_mod

    out = tmp_path / "out"
    _predict_into(out)
    assert _consistent(out)
    # a writer killed after moving the first new map: never a new map beside the old prediction.json
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(predict_mod.os, "replace", dying_replace)
    shifted = f"{ROI_RAS[0] + 12},{ROI_RAS[1]},{ROI_RAS[2]}:150,60,55"
    with pytest.raises(KeyboardInterrupt):
        _predict_into(out, roi=shifted)
    monkeypatch.undo()
    assert calls[0] == "attention.nii.gz"
    assert _consistent(out), "a new map sits beside an old prediction.json"
    # staging folders of killed writers are removed by the next one
    (out / ".ipmn-predict-dead1234").mkdir()
    (out / ".ipmn-predict-dead1234" / "attention.nii.gz").write_bytes(b"x" * 1000)
    _predict_into(out)
    assert _consistent(out) and (out / "prediction.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_concurrent_writers_take_turns(tmp_path):
    from ipmn.predict import output_lock

    tmp_path.joinpath("o").mkdir()
    order = []

    def second():
        with output_lock(tmp_path / "o"):
            order.append(("second", time.perf_counter()))

    with output_lock(tmp_path / "o"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append(("first-release", time.perf_counter()))
    t.join(5)
    assert [name for name, _ in order] == ["first-release", "second"]


# ------------------------------------------------------------------------------------------------ item 4
def test_package_files_are_shareable_and_stale_temporaries_go(tmp_path):
    import torch

    from ipmn.models import build_model, save_package

    umask = os.umask(0o022)
    try:
        stale = tmp_path / ".pkg.tmp-999999999-0123abcd"  # a PID that cannot run
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"x" * 100)
        torch.manual_seed(0)
        cfg = {"arch": "vit_tiny_patch16_224", "depth": 1, "embed_dim": 48, "num_heads": 3}
        pkg = save_package(tmp_path / "pkg", build_model(cfg), cfg)
    finally:
        os.umask(umask)
    assert oct((pkg / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((pkg / "config.json").stat().st_mode & 0o777) == oct(0o644)
    assert oct(pkg.stat().st_mode & 0o777) == oct(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


# ------------------------------------------------------------------------------------------------ items 1, 5
def _old_run(folder: Path, kind: str) -> dict:
    """A finished run as a folder of planted files (what --overwrite must not lose)."""
    folder.mkdir(parents=True)
    files = {folder / "run.json": json.dumps({"kind": kind, "fingerprint": "old"}),
             folder / "summary.json": json.dumps({"finished": True, "planted": 1}),
             folder / "fold_0" / "result.json": "{\"metrics\": \"precious\"}"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {p: p.read_text() for p in files}


@pytest.fixture(scope="module")
def truncated_cohort(tmp_path_factory) -> Path:
    """Twelve cases (four per class, one patient each) whose T1 is the sample's, truncated: the run passes its
    cohort, fold and lesion-mask checks (the demo preset's lesion-map loss) and then fails on the first case
    it reads."""
    root = tmp_path_factory.mktemp("trunc_cohort")
    raw = (SAMPLE / "sample_t1.nii.gz").read_bytes()
    (root / "t1.nii.gz").write_bytes(raw[: len(raw) // 2])
    lines = ["case_id,t1,t2,roi,label,lesion"]
    for i, label in enumerate(["normal", "low", "high"] * 4):
        lines.append(f"c{i},t1.nii.gz,{SAMPLE / 'sample_t2.nii.gz'},{SAMPLE / 'sample_roi.mrk.json'},{label},"
                     f"{SAMPLE / 'sample_lesion.nii.gz'}")
    (root / "cohort.csv").write_text("\n".join(lines) + "\n")
    return root / "cohort.csv"


def test_failed_overwrite_keeps_the_old_training(truncated_cohort, tmp_path, capsys):
    out = tmp_path / "model"
    work = tmp_path / "model.train"
    old_work = _old_run(work, "ipmn-train")
    out.mkdir()
    (out / "config.json").write_text("{\"format\": \"ipmn-model\", \"planted\": true}")
    (out / "model.safetensors").write_bytes(b"old weights")
    rc, _, err = run(capsys, "train", "--cohort", truncated_cohort, "--config", "demo", "--out", out,
                     "--overwrite", "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--progress", "none",
                     "--cache-dir", tmp_path / "cache")
    assert_refused(rc, err, "truncated")
    assert {p: p.read_text() for p in old_work} == old_work
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model", "model.train"]  # no staging left


def test_failed_overwrite_keeps_the_old_cv_run(truncated_cohort, tmp_path, capsys):
    run_dir = tmp_path / "run"
    old = _old_run(run_dir, "ipmn-cv")
    rc, _, err = run(capsys, "cv", "--cohort", truncated_cohort, "--config", "demo", "--out", run_dir,
                     "--overwrite", "--outer", "2", "--inner", "2", "--epochs", "1", "--device", "cpu",
                     "--progress", "none", "--cache-dir", tmp_path / "cache")
    assert_refused(rc, err, "truncated")
    assert {p: p.read_text() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


def test_overwrite_swaps_in_the_new_run_on_success(tmp_path):
    from ipmn.runs import commit_overwrite, overwrite_staging

    folder = tmp_path / "run"
    _old_run(folder, "ipmn-cv")
    staging = overwrite_staging(folder)
    staging.mkdir()
    (staging / "run.json").write_text("{\"kind\": \"ipmn-cv\", \"fingerprint\": \"new\"}")
    assert json.loads((folder / "run.json").read_text())["fingerprint"] == "old"  # untouched while building
    commit_overwrite(staging, folder)
    assert json.loads((folder / "run.json").read_text())["fingerprint"] == "new"
    assert not (folder / "fold_0").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # a swap killed between its two renames: the next run puts the old folder back before starting
    (tmp_path / ".run.replaced").mkdir()
    (tmp_path / ".run.replaced" / "run.json").write_text("{}")
    shutil.rmtree(folder)
    overwrite_staging(folder)
    assert (folder / "run.json").read_text() == "{}"


def test_cv_overwrite_is_swapped_in_only_when_every_fold_finished(tmp_path, monkeypatch):
    """run_cv --overwrite with the folds stubbed (no training): a fold that fails keeps the old run whole;
    a run that finishes replaces it and leaves no staging folder."""
    import ipmn.cv as cv_mod
    import ipmn.windows as windows_mod
    from ipmn.cohort import Case
    from ipmn.cv import run_cv

    cases = [Case(f"c{i}", i % 3, SAMPLE / "sample_t1.nii.gz", SAMPLE / "sample_t2.nii.gz", "roi", "", f"p{i}")
             for i in range(12)]
    cfg = {"model": {"arch": "vit_tiny_patch16_224", "depth": 1, "embed_dim": 48, "num_heads": 3},
           "train": {"epochs": 1}, "cv": {"outer": 2, "inner": 2}}
    run_dir = tmp_path / "run"
    old = _old_run(run_dir, "ipmn-cv")
    monkeypatch.setattr(windows_mod, "load_grids", lambda cases, cfg, progress: {})

    def fake_fold(fail_at):
        def run_fold(run_dir, variant, cfg, splits, fold, *args):
            if fold == fail_at:
                raise RuntimeError(f"fold {fold} died")
            path = Path(run_dir) / variant["name"] / f"fold_{fold}" / "result.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"fold": fold}))
            return {"metrics": {}}

        return run_fold

    monkeypatch.setattr(cv_mod, "run_fold", fake_fold(fail_at=1))
    with pytest.raises(RuntimeError, match="fold 1 died"):
        run_cv(cases, cfg, run_dir, overwrite=True, make_report=False)
    assert {p: p.read_text() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    monkeypatch.setattr(cv_mod, "run_fold", fake_fold(fail_at=None))
    out = run_cv(cases, cfg, run_dir, overwrite=True, make_report=False)
    assert out["complete"] and out["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["kind"] == "ipmn-cv"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "fold_0").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
