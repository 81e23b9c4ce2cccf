"""Bad input: one clear error line, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from ipmn.roi import ROI, write_mrk_json


def _assert_clean_failure(proc, out_dir, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("ipmn:")]
    assert len(lines) == 1 and lines[0].startswith("ipmn: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    if out_dir.exists():
        assert not list(out_dir.iterdir()), list(out_dir.iterdir())


def _grid(case, tmp_path, **over):
    args = {"t1": case["t1"], "t2": case["t2"], "roi": case["roi"]}
    args.update(over)
    out = tmp_path / "out"
    cmd = ["grid", "--out", out]
    for k, v in args.items():
        if v is not None:
            cmd += [f"--{k}", v]
    return run_cli(*cmd), out


def _write(arr, path, spacing=(1.0, 1.0, 3.0), origin=None):
    img = sitk.GetImageFromArray(arr, isVector=False)
    img.SetSpacing(spacing[: img.GetDimension()])
    if origin is not None:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def test_good_case_works(phantom_case, tmp_path):
    proc, out = _grid(phantom_case, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "grid.png").stat().st_size > 1000
    assert np.load(out / "grid.npy").shape == (1, 2, 192, 192)


def test_missing_file(phantom_case, tmp_path):
    proc, out = _grid(phantom_case, tmp_path, t1=tmp_path / "nope.nii.gz")
    _assert_clean_failure(proc, out, "T1", "not found")


def test_corrupt_file(phantom_case, tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage" * 50)
    proc, out = _grid(phantom_case, tmp_path, t2=bad)
    _assert_clean_failure(proc, out, "T2", "cannot read")


def test_2d_and_4d_images(phantom_case, tmp_path):
    two_d = _write(np.random.rand(32, 32).astype(np.float32), tmp_path / "2d.nrrd")
    proc, out = _grid(phantom_case, tmp_path, t1=two_d)
    _assert_clean_failure(proc, out, "2-D")
    four_d = _write(np.random.rand(3, 4, 16, 16).astype(np.float32), tmp_path / "4d.nii.gz", spacing=(1, 1, 1, 1))
    proc, out = _grid(phantom_case, tmp_path, t2=four_d)
    _assert_clean_failure(proc, out, "4-D")


def test_nan_voxels_refused_or_cleaned(phantom_case, tmp_path):
    img = sitk.ReadImage(str(phantom_case["t1"]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, :5] = np.nan
    arr[1, 0, 0] = np.inf
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(nan_img, str(path))
    proc, out = _grid(phantom_case, tmp_path, t1=path)
    _assert_clean_failure(proc, out, "6 NaN/Inf voxels")
    proc = run_cli("grid", "--t1", path, "--t2", phantom_case["t2"], "--roi", phantom_case["roi"],
                   "--out", tmp_path / "clean", "--nonfinite", "clean")
    assert proc.returncode == 0, proc.stderr


def test_constant_image(phantom_case, tmp_path):
    const = _write(np.full((20, 30, 30), 7, np.float32), tmp_path / "const.nii.gz")
    proc, out = _grid(phantom_case, tmp_path, t1=const)
    _assert_clean_failure(proc, out, "same value")


def test_roi_outside_volume(phantom_case, tmp_path):
    roi = write_mrk_json(ROI([900, 900, 900], [60, 60, 60], np.eye(3)), tmp_path / "far.mrk.json")
    proc, out = _grid(phantom_case, tmp_path, roi=roi)
    _assert_clean_failure(proc, out, "does not intersect the T1")


def test_roi_thinner_than_k(phantom_case, tmp_path):
    base = phantom_case["case"]["roi"]
    thin = write_mrk_json(ROI(base.center, [base.size[0], base.size[1], 8.0], base.axes), tmp_path / "thin.mrk.json")
    proc, out = _grid(phantom_case, tmp_path, roi=thin)
    _assert_clean_failure(proc, out, "slice(s)", "k=9")
    assert "covers 2 slice" in proc.stderr or "covers 3 slice" in proc.stderr or "covers 1 slice" in proc.stderr
    proc = run_cli("grid", "--t1", phantom_case["t1"], "--t2", phantom_case["t2"], "--roi", thin,
                   "--out", tmp_path / "padded", "--pad")
    assert proc.returncode == 0, proc.stderr


def test_t2_not_overlapping_roi(phantom_case, tmp_path):
    far = _write(np.random.rand(20, 40, 40).astype(np.float32), tmp_path / "far_t2.nii.gz", origin=(2000.0, 2000.0, 2000.0))
    proc, out = _grid(phantom_case, tmp_path, t2=far)
    _assert_clean_failure(proc, out, "T2 volume covers only 0%")


def test_manifest_problems_listed_at_once(phantom_cohort, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(phantom_cohort.parent, root)
    lines = (root / "cohort.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows[0] = rows[0].replace(",high,", ",severe,").replace(",low,", ",severe,").replace(",normal,", ",severe,")
    rows[2] = rows[1]  # duplicate case id
    first_id = rows[3].split(",")[0]
    (root / "cases" / f"{first_id}_t2.nii.gz").unlink()
    (root / "cohort.csv").write_text("\n".join([header, *rows]) + "\n")
    proc = run_cli("cohort", root / "cohort.csv")
    _assert_clean_failure(proc, tmp_path / "none", "3 problem", "unknown label 'severe'", "duplicate case_id",
                          "t2 file not found")
    (root / "nocol.csv").write_text("case_id,t1,t2,roi\nx,a,b,c\n")
    proc = run_cli("cohort", root / "nocol.csv")
    _assert_clean_failure(proc, tmp_path / "none", "missing column", "label")


@pytest.mark.parametrize("bad", ["0,0,0:10,10", "a,b,c:1,2,3"])
def test_bad_roi_string(phantom_case, tmp_path, bad):
    proc, out = _grid(phantom_case, tmp_path, roi=bad)
    assert proc.returncode == 2 and "ipmn: error:" in proc.stderr and "Traceback" not in proc.stderr
