"""``ipmn evaluate``: localisation metrics on planted maps, lesion resampling, a small cohort end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from ipmn.errors import IPMNError
from ipmn.evaluate import attention_lift, evaluate, lesion_on_reference, pointing_game

SPACING = (0.8, 0.8, 3.0)  # x, y, z mm: anisotropic, so the axis order matters


def _sphere(shape, centre_zyx, radius_mm, spacing_xyz=SPACING):
    zz, yy, xx = np.indices(shape, dtype=float)
    sx, sy, sz = spacing_xyz
    d2 = ((zz - centre_zyx[0]) * sz) ** 2 + ((yy - centre_zyx[1]) * sy) ** 2 + ((xx - centre_zyx[2]) * sx) ** 2
    return d2, d2 <= radius_mm**2


@pytest.fixture(scope="module")
def scene():
    shape = (20, 60, 60)
    _, lesion = _sphere(shape, (10, 30, 30), 4.0)
    region = np.zeros(shape, bool)
    region[2:18, 5:55, 5:55] = True
    return shape, lesion, region


def test_planted_map_on_the_lesion_hits_and_lifts(scene):
    shape, lesion, region = scene
    d2, _ = _sphere(shape, (10, 31, 29), 0)
    on = np.exp(-d2 / (2 * 3.0**2))
    p = pointing_game(on, lesion, SPACING, region)
    lift = attention_lift(on, lesion, region)
    assert p["hit"] is True and p["distance_mm"] == 0.0
    assert lift["lift"] > 5  # concentrated on the lesion
    assert lift["lesion_share"] == pytest.approx(lesion.sum() / region.sum())


def test_planted_map_off_the_lesion_misses_and_lift_below_one(scene):
    shape, lesion, region = scene
    d2, _ = _sphere(shape, (10, 30, 50), 0)  # 20 columns = 16 mm to the side
    off = np.exp(-d2 / (2 * 3.0**2))
    p = pointing_game(off, lesion, SPACING, region)
    assert p["hit"] is False and p["distance_mm"] == pytest.approx(16.0 - 4.0, abs=0.8)
    assert attention_lift(off, lesion, region)["lift"] < 1
    # a uniform map: lift exactly 1, and no pointing-game credit (every voxel ties at the maximum)
    flat = np.ones(shape)
    assert attention_lift(flat, lesion, region)["lift"] == pytest.approx(1.0)
    assert pointing_game(flat, lesion, SPACING, region)["hit"] is False


def test_pointing_distance_is_physical(scene):
    """5 voxels along x (4 mm) from the lesion edge is a hit; 2 slices along z (6 mm) is not."""
    shape, lesion, region = scene
    edge_x = np.argwhere(lesion[10, 30])[:, 0].max()  # last lesion column on the centre row
    near = np.zeros(shape)
    near[10, 30, edge_x + 5] = 1.0
    p = pointing_game(near, lesion, SPACING, region)
    assert p["hit"] is True and p["distance_mm"] == pytest.approx(4.0)
    edge_z = np.argwhere(lesion[:, 30, 30])[:, 0].max()
    far = np.zeros(shape)
    far[edge_z + 2, 30, 30] = 1.0
    p = pointing_game(far, lesion, SPACING, region)
    assert p["hit"] is False and p["distance_mm"] == pytest.approx(6.0)
    # the maximum is taken inside the region only
    outside = near.copy()
    outside[0, 0, 0] = 5.0
    assert pointing_game(outside, lesion, SPACING, region)["hit"] is True
    # no lesion in the region / a zero map: undefined, not a miss
    assert pointing_game(near, np.zeros(shape, bool), SPACING, region)["hit"] is None
    assert attention_lift(np.zeros(shape), lesion, region)["lift"] is None
    with pytest.raises(IPMNError, match="differ"):
        attention_lift(near[:-1], lesion, region)


def test_lesion_mask_resampled_to_t1_through_physical_space(tmp_path):
    ref = sitk.Image(48, 48, 16, sitk.sitkFloat32)  # T1-like: RAS-ish flipped axes, thick slices
    ref.SetSpacing((1.0, 1.0, 3.0))
    ref.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ref.SetOrigin((20.0, 15.0, -10.0))
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint((24.0, 20.0, 8.0)))
    # the mask lives in another geometry: permuted axes, finer spacing, its own origin
    les = sitk.Image(80, 40, 70, sitk.sitkUInt8)
    les.SetSpacing((0.5, 1.5, 0.6))
    les.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))
    les.SetOrigin(tuple(centre - np.array([12.0, 20.0, 14.0])))
    pts = np.array([[les.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for i in range(80)]
                    for k in range(70) for j in range(40)]).reshape(70, 40, 80, 3)
    arr = (np.linalg.norm(pts - centre, axis=-1) <= 6.0).astype(np.uint8) * 3  # label value 3
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(les)
    sitk.WriteImage(img, str(tmp_path / "lesion.nrrd"))
    got = lesion_on_reference(tmp_path / "lesion.nrrd", ref)
    ref_pts = np.array([[ref.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for i in range(48)]
                        for k in range(16) for j in range(48)]).reshape(16, 48, 48, 3)
    want = np.linalg.norm(ref_pts - centre, axis=-1) <= 6.0
    assert want.sum() > 50
    assert (got != want).sum() <= 0.15 * want.sum()  # boundary voxels only
    assert np.allclose(np.argwhere(got).mean(0), np.argwhere(want).mean(0), atol=0.5)


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """5 phantoms; two get a 'lesion' mask (a 10 mm sphere at the ROI centre, in its own geometry)."""
    from ipmn.phantoms import make_cohort
    from ipmn.roi import load_roi

    base = tmp_path_factory.mktemp("evalcohort")
    manifest = make_cohort(base, n=5, seed=11)
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    for r in rows[:2]:
        roi = load_roi(str(base / r["roi"]))
        centre_lps = roi.center_lps
        img = sitk.Image(30, 30, 30, sitk.sitkUInt8)
        img.SetSpacing((1.0, 1.0, 1.0))
        img.SetOrigin(tuple(centre_lps - 14.5))
        zz, yy, xx = np.indices((30, 30, 30))
        sphere = ((zz - 14.5) ** 2 + (yy - 14.5) ** 2 + (xx - 14.5) ** 2) <= 25
        out = sitk.GetImageFromArray(sphere.astype(np.uint8))
        out.CopyInformation(img)
        r["lesion"] = f"cases/{r['case_id']}_lesion.nrrd"
        sitk.WriteImage(out, str(base / r["lesion"]))
    for r in rows[2:]:
        r["lesion"] = ""
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest, rows


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    import torch

    from ipmn.models import build_model, save_package
    from ipmn.predict import Predictor

    torch.manual_seed(0)
    cfg = {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 48, "num_heads": 3}
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_package(folder, build_model(cfg), {**cfg, "name": "tiny-test", "card": "random weights",
                                           "preprocess": {"n4": False, "smoothing": "none", "version": 2,
                                                          "standardize": "minmax"}})
    return Predictor(folder, device="cpu", precision="fp32")


def _csv(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


def test_evaluate_labelled_cohort_with_lesions(cohort, predictor, tmp_path, one_torch_thread):
    manifest, rows = cohort
    out = tmp_path / "ev"
    m = evaluate(manifest, None, out, predictor=predictor, worst=2)
    got = _csv(out / "predictions.csv")
    assert [r["case_id"] for r in got] == [r["case_id"] for r in rows]
    for r, want in zip(got, rows, strict=True):
        assert r["label"] == want["label"] and not r["error"]
        probs = [float(r[f"p_{n}"]) for n in ("normal", "low", "high")]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
        assert r["predicted"] == ("normal", "low", "high")[int(np.argmax(probs))]
        assert (r["pointing_hit"] != "") == bool(want["lesion"]) == (r["lift"] != "")
    c = m["classification"]
    assert c["n"] == 5 and np.sum(c["confusion"]) == 5
    assert c["accuracy"] == pytest.approx(np.mean([r["correct"] == "1" for r in got]))
    for name in ("balanced_accuracy", "macro_auc", "ece", "recall_per_class"):
        assert name in c
    loc = m["localisation"]["overall"]
    assert loc["n"] == 2 and loc["pointing_game"] == np.mean([int(r["pointing_hit"]) for r in got[:2]])
    assert loc["lift_median"] == pytest.approx(np.median([float(r["lift"]) for r in got[:2]]), abs=1e-4)  # CSV rounds
    assert json.loads((out / "metrics.json").read_text())["n_cases"] == 5
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 and "src='http" not in report
    assert (out / "cases" / rows[0]["case_id"] / "attention.nii.gz").is_file()
    # prefetching the next case changes nothing: the same case through Predictor.predict alone
    base = manifest.parent
    alone = predictor.predict(base / rows[1]["t1"], base / rows[1]["t2"], base / rows[1]["roi"])
    assert [float(got[1][f"p_{n}"]) for n in ("normal", "low", "high")] == pytest.approx(
        [alone["probabilities"][n] for n in ("normal", "low", "high")], abs=1e-5)


def test_evaluate_without_labels_is_a_batch_predict(cohort, predictor, tmp_path, one_torch_thread):
    manifest, rows = cohort
    unl = manifest.parent / "unlabelled.csv"
    with open(unl, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["case_id", "t1", "t2", "roi"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("case_id", "t1", "t2", "roi")} for r in rows[2:4])
    m = evaluate(unl, None, tmp_path / "ev", predictor=predictor)
    got = _csv(tmp_path / "ev" / "predictions.csv")
    assert len(got) == 2 and all(r["label"] == "" and r["predicted"] for r in got)
    assert "classification" not in m and "localisation" not in m and m["labelled"] is False


def test_bad_manifest_is_one_clear_error(cohort, tmp_path):
    manifest, rows = cohort
    bad = tmp_path / "bad.csv"
    text = manifest.read_text(encoding="utf-8").splitlines()
    text[1] = text[1].replace(rows[0]["label"], "medium", 1)  # unknown label
    text[2] = text[2].replace("_t1.nii.gz", "_missing.nii.gz", 1)
    bad.write_text("\n".join(text).replace("cases/", str(manifest.parent / "cases") + "/"), encoding="utf-8")
    proc = run_cli("evaluate", "--cohort", bad, "--model", tmp_path / "nomodel", "--out", tmp_path / "o")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipmn: error:") and "2 problem(s)" in lines[0]
    assert "medium" in lines[0] and "not found" in lines[0]
    partly = manifest.parent / "partly.csv"  # one row labelled, one not
    partly.write_text("\n".join([text[0], text[3].replace(rows[2]["label"], "", 1), text[4]]), encoding="utf-8")
    with pytest.raises(IPMNError, match="1 problem.*unknown label ''"):
        evaluate(partly, [tmp_path / "nomodel"], tmp_path / "o2")


def test_recorded_evaluation_is_what_the_model_picker_shows(cohort, predictor, tmp_path, one_torch_thread):
    import shutil

    from ipmn import registry
    from ipmn.evaluate import record_evaluation

    manifest, _ = cohort
    model = tmp_path / "model"
    shutil.copytree(predictor.dirs[0], model)
    m = evaluate(manifest, None, tmp_path / "ev", predictor=predictor, worst=0)
    entry = record_evaluation(model, m, "5 phantoms (test)")
    info = registry.model_info(model)
    assert info.metrics_source == "held-out: 5 phantoms (test)"
    assert info.metrics["accuracy"] == pytest.approx(m["classification"]["accuracy"])
    assert entry["localisation"]["n"] == 2 and entry["n_cases"] == 5
    from ipmn.models import load_package

    load_package(model)  # the package still loads
    with pytest.raises(IPMNError, match="labelled"):
        record_evaluation(model, {"n_cases": 1, "n_failed": 0}, "x")


def test_an_empty_lesion_mask_means_no_lesion_not_an_error(tmp_path):
    """A normal phantom's lesion mask is all zero: its case is predicted, and simply not scored."""
    from ipmn.evaluate import localise

    attention = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 10, 12)).astype(np.float32))
    empty = sitk.Image(12, 10, 8, sitk.sitkUInt8)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    loc = localise(attention, np.ones((8, 10, 12), bool), tmp_path / "empty.nii.gz")
    assert loc["hit"] is None and loc["lift"] is None and loc["lesion_voxels_in_roi"] == 0
