"""Nested cross-validation: leakage-free splits, a short real CV run with every output, resume, bad input.

Real phantoms and a 2-layer ViT (96 wide, 192 px); the learning test (``slow``) trains longer.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json

import numpy as np
import pytest

from conftest import shared_cohort
from ipmn.errors import IPMNError

TINY = {
    "model": {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 96, "num_heads": 3},
    "preprocess": {"n4": False, "smoothing": "none"},
    "train": {
        "epochs": 2,
        "optimizer": "adamw",
        "lr": 1e-3,
        "windows_per_case": 2,
        "batch_size": 8,
        "seed": 1,
    },
    "cv": {"outer": 2, "inner": 2, "seed": 3, "examples": 2},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def grouped_manifest(tmp_path_factory):
    """The phantom cohort with a patient_id column: within each class, two pairs of cases share a patient."""
    manifest = shared_cohort(tmp_path_factory)
    rows = list(csv.DictReader(open(manifest, newline="")))
    seen: dict[str, int] = {}
    for r in rows:
        i = seen.get(r["label"], 0)
        seen[r["label"]] = i + 1
        r["patient_id"] = f"P-{r['label']}-{i // 2}" if i < 4 else f"P-{r['case_id']}"
    out = manifest.parent / "cohort_grouped.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="session")
def cases(grouped_manifest):
    from ipmn.cohort import load_cohort

    return load_cohort(grouped_manifest)


def tiny(tmp_path_factory, **train) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(train)
    cfg["data"] = {"cache_dir": str(tmp_path_factory.getbasetemp() / "ipmn_grid_cache")}
    return cfg


def _cli(argv):
    from ipmn import cli_train

    parser = argparse.ArgumentParser(prog="ipmn")
    cli_train.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


# ------------------------------------------------------------------------------------------------ splits
def _check_no_leak(splits, cases):
    by_id = {c.case_id: c for c in cases}
    test_patients = {}
    for f in splits["folds"]:
        test, train = set(f["test"]), set(f["train"])
        assert not test & train and test | train | set(f.get("excluded_from_train", [])) == set(by_id)
        for cid in test:
            p = by_id[cid].patient_id
            assert test_patients.setdefault(p, f["fold"]) == f["fold"], f"patient {p} in two outer test folds"
        train_patients = {by_id[c].patient_id for c in train}
        assert not train_patients & {by_id[c].patient_id for c in test}
        for inner in f["inner"]:
            assert not (set(inner["train"]) | set(inner["val"])) & test
            assert set(inner["train"]) | set(inner["val"]) == train
            assert not {by_id[c].patient_id for c in inner["train"]} & {
                by_id[c].patient_id for c in inner["val"]
            }


@pytest.mark.parametrize("outer, inner", [(2, 2), (3, 2)])
def test_splits_are_patient_level_stratified_and_reproducible(cases, outer, inner):
    from ipmn.splits import make_splits

    s = make_splits(cases, outer, inner, seed=11)
    _check_no_leak(s, cases)
    labels = {c.case_id: c.label for c in cases}
    for f in s["folds"]:
        assert {labels[c] for c in f["test"]} == {0, 1, 2}, "every outer test fold holds every class"
    assert s == make_splits(cases, outer, inner, seed=11)
    assert s["folds"] != make_splits(cases, outer, inner, seed=12)["folds"]
    assert len({c.patient_id for c in cases}) < len(cases)  # the grouping is really exercised


def test_leave_one_center_out_and_group_by_center(tmp_path_factory):
    from ipmn.cohort import load_cohort
    from ipmn.splits import make_splits

    cases = load_cohort(shared_cohort(tmp_path_factory))  # one case per patient: enough per centre

    s = make_splits(cases, inner=2, leave_one_center_out=True)
    assert [f["test_center"] for f in s["folds"]] == ["A", "B"]
    by_id = {c.case_id: c for c in cases}
    for f in s["folds"]:
        assert {by_id[c].center for c in f["test"]} == {f["test_center"]}
        assert f["test_center"] not in {by_id[c].center for c in f["train"]}
    _check_no_leak(s, cases)
    g = make_splits(cases, outer=2, inner=2, group_by="center")
    for f in g["folds"]:
        assert not {by_id[c].center for c in f["test"]} & {by_id[c].center for c in f["train"]}
    with pytest.raises(IPMNError, match="centres"):
        make_splits(cases, outer=3, inner=2, group_by="center")


def test_split_errors(cases):
    from ipmn.splits import make_splits

    with pytest.raises(IPMNError) as err:
        make_splits(cases, outer=6, inner=2)
    msg = str(err.value)
    assert "'normal' has 4 patients" in msg and "--outer 4" in msg
    with pytest.raises(IPMNError, match="--inner"):
        make_splits(cases, outer=2, inner=4)
    with pytest.raises(IPMNError, match="fewer than two classes"):
        make_splits([c for c in cases if c.label == 2], outer=2, inner=2)
    with pytest.raises(IPMNError, match="at least two centres"):
        make_splits([c for c in cases if c.center == "A"], inner=2, leave_one_center_out=True)


# ------------------------------------------------------------------------------------------------ a real CV run
@pytest.fixture(scope="module")
def cv_run(cases, grouped_manifest, tmp_path_factory):
    """2 outer x 2 inner folds, run as a killed fold, resumed, then the other fold in its own call."""
    import ipmn.cv as cvmod
    from ipmn.cv import run_cv

    run = tmp_path_factory.mktemp("cv") / "run"
    cfg = tiny(tmp_path_factory)
    info = {"synthetic": True, "source": str(grouped_manifest)}
    real_train = cvmod.__dict__.get("train_model")
    import ipmn.train as trainmod

    original = trainmod.train_model
    calls = []

    def killed_in_final(*args, **kwargs):  # the process "dies" when fold 0's outer model starts training
        calls.append(str(args[2]))
        if str(args[2]).endswith("fold_0/final"):
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    trainmod.train_model = killed_in_final
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cv(cases, cfg, run, fold=0, cohort_spec=grouped_manifest, cohort_info=info)
    finally:
        trainmod.train_model = original
    assert real_train is None  # cv imports train_model lazily, so the patch above was effective
    assert (run / "splits.json").exists() and not (
        run / "vit_tiny_patch16_224" / "fold_0" / "result.json"
    ).exists()
    inner = sorted((run / "vit_tiny_patch16_224" / "fold_0" / "inner").glob("*/summary.json"))
    assert len(inner) == 2
    stamps = {p: p.stat().st_mtime_ns for p in inner}
    partial = run_cv(cases, cfg, run, fold=0, cohort_spec=grouped_manifest, cohort_info=info)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "finished inner folds were recomputed"
    assert not partial["complete"]
    partial_metrics = json.loads((run / "metrics.json").read_text())
    assert partial_metrics["complete"] is False and len(partial_metrics["folds"]) == 1
    run_cv(cases, cfg, run, fold=1, cohort_spec=grouped_manifest, cohort_info=info)
    return {"run": run, "cfg": cfg, "cases": cases}


def test_cv_writes_every_output(cv_run):
    run = cv_run["run"]
    for name in ("run.json", "splits.json", "metrics.json", "predictions.csv", "report.html"):
        assert (run / name).is_file(), name
    for k in (0, 1):
        fold = run / "vit_tiny_patch16_224" / f"fold_{k}"
        for name in ("result.json", "selection.json", "model/config.json", "model/model.safetensors"):
            assert (fold / name).is_file(), (k, name)
        assert list((fold / "examples").glob("*.png"))
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert 'src="http' not in html and "<script src" not in html and "<link" not in html
    for needle in ("ddof = 1", "Synthetic phantoms", "Accuracy", "AUC", "ECE after T"):
        assert needle in html, needle
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["ddof"] == 1
    assert metrics["summary"]["accuracy"]["ddof"] == 1 and len(metrics["folds"]) == 2
    assert metrics["models"][0]["name"] == "vit_tiny_patch16_224"


def test_metrics_recomputed_from_predictions_csv(cv_run):
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
    )

    run = cv_run["run"]
    rows = list(csv.DictReader(open(run / "predictions.csv", newline="")))
    assert {r["case_id"] for r in rows} == {
        c.case_id for c in cv_run["cases"]
    }  # every case tested exactly once
    assert len(rows) == len(cv_run["cases"])
    metrics = json.loads((run / "metrics.json").read_text())
    per_fold = []
    for f in metrics["folds"]:
        sel = [r for r in rows if int(r["fold"]) == f["fold"]]
        y = np.array([int(r["true"]) for r in sel])
        p = np.array([[float(r["prob_normal"]), float(r["prob_low"]), float(r["prob_high"])] for r in sel])
        pred = p.argmax(1)
        expect = {
            "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "macro_precision": precision_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0),
            "macro_recall": recall_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0),
            "macro_f1": f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0),
        }
        if len(set(y.tolist())) == 3:
            from sklearn.metrics import roc_auc_score

            expect["macro_auc"] = roc_auc_score(y, p, multi_class="ovr", average="macro")
        for key, value in expect.items():
            assert f["metrics"][key] == pytest.approx(value, abs=1e-5), (f["fold"], key)
        per_fold.append(expect)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        values = [e[key] for e in per_fold]
        assert metrics["summary"][key]["mean"] == pytest.approx(np.mean(values), abs=1e-5)
        assert metrics["summary"][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-5)


def test_selection_never_touches_the_outer_test_fold(cv_run):
    run = cv_run["run"]
    splits = json.loads((run / "splits.json").read_text())
    _check_no_leak(splits, cv_run["cases"])
    for f in splits["folds"]:
        sel = json.loads((run / "vit_tiny_patch16_224" / f"fold_{f['fold']}" / "selection.json").read_text())
        test = set(f["test"])
        assert set(sel["outer_test"]) == test
        assert sel["inner_used"], "inner runs recorded"
        for used in sel["inner_used"]:  # the case ids train_model actually trained / validated on
            assert not (set(used["train"]) | set(used["val"])) & test
        assert 1 <= sel["selected"]["epoch"] <= cv_run["cfg"]["train"]["epochs"]
        assert sel["temperature"] > 0
        final = json.loads(
            (run / "vit_tiny_patch16_224" / f"fold_{f['fold']}" / "final" / "summary.json").read_text()
        )
        assert set(final["train_cases"]) == set(f["train"]) and not final["val_cases"]
        assert final["epochs_run"] == sel["selected"]["epoch"]


def test_fold_packages_apply_their_temperature_at_prediction(cv_run):
    """The temperature chosen on inner folds travels in each fold package: Predictor on the outer test cases
    reproduces the report's calibrated probabilities and its "ECE after T"."""
    from ipmn.metrics import ece_score
    from ipmn.predict import Predictor

    run, by_id = cv_run["run"], {c.case_id: c for c in cv_run["cases"]}
    temperatures = []
    for k in (0, 1):
        fold = run / "vit_tiny_patch16_224" / f"fold_{k}"
        result = json.loads((fold / "result.json").read_text())
        config = json.loads((fold / "model" / "config.json").read_text())
        assert config["calibration"]["temperature"] == pytest.approx(result["temperature"])
        temperatures.append(result["temperature"])
        predictor = Predictor([fold / "model"], device="cpu", precision="fp32")
        probs, raw, y = [], [], []
        for row in result["predictions"]:
            c = by_id[row["case_id"]]
            out = predictor.predict(t1=c.t1, t2=c.t2, **c.roi_spec, windows="central")
            probs.append([out["probabilities"][n] for n in ("normal", "low", "high")])
            raw.append(row["probs"])
            y.append(row["true"])
            assert out["calibration"]["temperature"] == pytest.approx(result["temperature"])
            assert probs[-1] == pytest.approx(row["probs_calibrated"], abs=2e-4)
        probs, y = np.array(probs), np.array(y)
        assert ece_score(y, probs) == pytest.approx(result["metrics_calibrated"]["ece"], abs=1e-3)
    # the check means something only if some temperature changed the probabilities
    assert any(abs(t - 1.0) > 0.05 for t in temperatures), temperatures


def test_choices_do_not_depend_on_the_outer_test_fold(cases, tmp_path_factory):
    """Leakage invariance: give the outer test cases of fold 0 other images and other labels. Everything
    chosen for that fold (epoch, temperature, Nyul landmarks, class weights, the inner cases) must stay the
    same; each of those would change if it were computed on the whole cohort."""
    import dataclasses

    from ipmn.cv import run_cv
    from ipmn.splits import make_splits

    cfg = tiny(tmp_path_factory, windows_per_case=None, window_stride=2)  # counts follow each ROI's slices
    cfg["preprocess"]["standardize"] = "nyul"
    cfg["cv"]["examples"] = 0
    splits = make_splits(cases, outer=2, inner=2, seed=3)
    test_ids = set(splits["folds"][0]["test"])
    donor = next(c for c in cases if c.case_id not in test_ids and c.label == 0)
    # every outer test case now shows the same normal phantom and is labelled high risk
    changed = [dataclasses.replace(c, t1=donor.t1, t2=donor.t2, roi=donor.roi, mask=donor.mask, label=2)
               if c.case_id in test_ids else c for c in cases]
    assert sum(c.label == 2 for c in changed) > sum(c.label == 2 for c in cases)  # whole-cohort counts differ
    changed_splits = copy.deepcopy(splits)
    for entry in changed_splits["cases"]:
        if entry["case_id"] in test_ids:
            entry["label"] = 2

    chosen = []
    for name, cohort, sp in (("original", cases, splits), ("changed", changed, changed_splits)):
        run = tmp_path_factory.mktemp(f"leak-{name}") / "run"
        run_cv(cohort, cfg, run, fold=0, splits=sp, make_report=False)
        fold = run / "vit_tiny_patch16_224" / "fold_0"
        sel = json.loads((fold / "selection.json").read_text())
        final = json.loads((fold / "final" / "summary.json").read_text())
        assert final["landmarks"], "nyul landmarks were fitted"
        chosen.append({"epoch": sel["selected"], "temperature": round(sel["temperature"], 6),
                       "inner": sel["inner_used"], "landmarks": final["landmarks"],
                       "class_weights": final["class_weights"], "train": sorted(final["train_cases"])})
    assert chosen[0]["class_weights"] and len(set(chosen[0]["class_weights"])) > 1  # not all weights 1
    assert chosen[0] == chosen[1]


def test_cv_reports_where_the_maps_sit_on_outer_test_cases(cv_run):
    """Phantoms carry lesion masks: each fold scores its own test cases' maps (pointing game, lift) and
    the report pools them; the metrics themselves are checked against planted maps in test_evaluate."""
    run, by_id = cv_run["run"], {c.case_id: c for c in cv_run["cases"]}
    with_mask = {c.case_id for c in cv_run["cases"] if c.lesion is not None}
    assert with_mask, "the phantom cohort lists lesion masks"
    scored = []
    for k in (0, 1):
        fold = run / "vit_tiny_patch16_224" / f"fold_{k}"
        result = json.loads((fold / "result.json").read_text())
        tested = {p["case_id"] for p in result["predictions"]}
        rows = result["localisation"]["cases"]
        assert {r["case_id"] for r in rows} == tested & with_mask  # only this fold's test cases
        scored += [r for r in rows if r["pointing_hit"] is not None]
    abnormal = [r for r in scored if by_id[r["case_id"]].label > 0]
    assert abnormal, "lesion-bearing test cases were scored"
    loc = json.loads((run / "metrics.json").read_text())["models"][0]["localisation"]["overall"]
    assert loc["n"] == len(scored) and loc["pointing_hits"] == sum(r["pointing_hit"] for r in scored)
    assert 0.0 <= loc["pointing_game"] <= 1.0 and loc["lift_median"] >= 0.0
    assert "pointing game" in (run / "report.html").read_text()


def test_finished_folds_are_not_recomputed_and_report_merges(cv_run, tmp_path_factory):
    from ipmn.cv import run_cv

    run = cv_run["run"]
    results = sorted(run.glob("*/fold_*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    out = run_cv(cv_run["cases"], cv_run["cfg"], run, cohort_info={"synthetic": True})
    assert out["complete"] and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    before = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    assert _cli(["cv-report", run, "--progress", "none"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["summary"] == before["summary"]


def test_a_different_run_in_the_folder_is_refused(cv_run, tmp_path):
    from ipmn.cv import run_cv

    run = cv_run["run"]
    other = copy.deepcopy(cv_run["cfg"])
    other["train"]["lr"] = 5e-4
    with pytest.raises(IPMNError, match="different cv run"):
        run_cv(cv_run["cases"], other, run)
    # --resume continues the stored run with its own settings: everything is finished already
    out = run_cv(cv_run["cases"], other, run, resume=True, make_report=False)
    assert out["complete"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(IPMNError, match="not an ipmn cv run folder"):
            run_cv(cv_run["cases"], other, foreign, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_cv_cli_bad_input(grouped_manifest, tmp_path_factory, tmp_path):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tmp_path_factory)))
    out = tmp_path / "run"
    with pytest.raises(IPMNError, match="--outer 4"):
        _cli(["cv", "--cohort", grouped_manifest, "--config", cfg, "--out", out, "--outer", 10])
    with pytest.raises(IPMNError, match="--fold 7 does not exist"):
        _cli(
            [
                "cv",
                "--cohort",
                grouped_manifest,
                "--config",
                cfg,
                "--out",
                out,
                "--fold",
                7,
                "--progress",
                "none",
            ]
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("cv:\n  folds: 3\n")
    with pytest.raises(IPMNError, match="folds"):
        _cli(["cv", "--cohort", grouped_manifest, "--config", bad, "--out", tmp_path / "r2"])
    with pytest.raises(IPMNError, match="--cohort is required"):
        _cli(["cv", "--config", cfg, "--out", tmp_path / "r3"])
    broken = tmp_path / "broken.csv"
    broken.write_text("case_id,t1,t2,roi,label\na,nope1.nii.gz,nope2.nii.gz,r.mrk.json,low\nb,x,y,z,weird\n")
    with pytest.raises(IPMNError) as err:
        _cli(["cv", "--cohort", broken, "--config", cfg, "--out", tmp_path / "r4"])
    assert "problem(s)" in str(err.value) and "weird" in str(err.value) and "nope1" in str(err.value)
    assert (
        not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()
    )


def test_table_two_variants_share_splits(cases, grouped_manifest, tmp_path_factory):
    """--modalities t1t2 t1: Table II layout, one model list entry per input, the same splits."""
    from ipmn.cv import run_cv

    run = tmp_path_factory.mktemp("cv2") / "run"
    cfg = tiny(tmp_path_factory, epochs=1, windows_per_case=1)
    cfg["cv"]["examples"] = 0
    out = run_cv(cases, cfg, run, modalities=["t1t2", "t1"], cohort_info={"synthetic": True})
    assert out["complete"]
    metrics = json.loads((run / "metrics.json").read_text())
    names = [m["name"] for m in metrics["models"]]
    assert names == ["vit_tiny_patch16_224-t1t2-early", "vit_tiny_patch16_224-t1"]
    assert [m["label"] for m in metrics["models"]] == ["T1+T2 early fusion", "T1"]
    t1 = json.loads((run / names[1] / "fold_0" / "model" / "config.json").read_text())
    assert t1["modalities"] == ["t1"]
    rows = list(csv.DictReader(open(run / "predictions.csv", newline="")))
    per_model = {n: {(r["case_id"], r["fold"]) for r in rows if r["model"] == n} for n in names}
    assert per_model[names[0]] == per_model[names[1]]  # same splits
    assert "Table II layout" in (run / "report.html").read_text()



def test_table_one_cnn_baselines_train_without_the_vits_teacher(cases, tmp_path_factory):
    """A distilled ViT recipe (train.teacher_arch) vs a CNN on the same splits: the ViT's trainings each
    train their own teacher; the CNN is a baseline and trains on the labels alone (no teacher folder)."""
    from ipmn.cv import make_variants, run_cv, variant_config
    from ipmn.runs import cv_identity

    run = tmp_path_factory.mktemp("cv1") / "run"
    cfg = tiny(tmp_path_factory, epochs=1, windows_per_case=1, teacher_arch="smallcnn", teacher_epochs=1)
    cfg["cv"]["examples"] = 0
    run_cv(cases, cfg, run, models=["vit_tiny_patch16_224", "smallcnn"], fold=0, make_report=False,
           cohort_info={"synthetic": True})
    vit, cnn = run / "vit_tiny_patch16_224" / "fold_0", run / "smallcnn" / "fold_0"
    assert (vit / "final" / "teacher" / "model" / "config.json").exists()
    assert any((d / "teacher").is_dir() for d in (vit / "inner").iterdir())
    assert (cnn / "final").is_dir() and not (cnn / "final" / "teacher").exists()
    assert not any((d / "teacher").exists() for d in (cnn / "inner").iterdir())
    # the override is part of what the run is, and does not leak into the ViT variant
    from ipmn.config import resolve_config

    resolved = resolve_config(cfg)
    v_vit, v_cnn = make_variants(resolved, models=["vit_tiny_patch16_224", "smallcnn"])
    assert variant_config(resolved, v_vit)["train"]["teacher_arch"] == "smallcnn"
    assert variant_config(resolved, v_cnn)["train"]["teacher_arch"] is None
    plain = resolve_config(tiny(tmp_path_factory, epochs=1))
    assert "train" not in make_variants(plain, models=["smallcnn"])[0]
    assert cv_identity(resolved, [v_cnn], cases)["variants"][0]["train"] == {"teacher_arch": None, "teacher_epochs": None}

@pytest.mark.slow
def test_learning_works_on_easy_phantoms(learning_cohort, tmp_path_factory):
    """A small ViT reaches clearly-above-chance outer-fold accuracy on 90 phantoms (chance = 1/3): nested
    CV (3 outer x 2 inner folds, epoch chosen on the inner folds), every fold's localisation scored.

    The 90 phantoms are the session's ``learning_cohort`` (rendered once; test_learning trains on them).
    With 90 test predictions an accuracy of 0.5 is 3.4 standard deviations of a chance classifier above
    1/3 (binomial, p < 0.001). A convolutional stem in front of 2 layers learns from 30-60 cases within
    12 epochs; 32-px cells (96-px grids, 6 x 6 tokens) and central windows for validation and testing keep
    it to a few minutes on one core."""
    from ipmn.cohort import load_cohort
    from ipmn.cv import run_cv

    base = tmp_path_factory.mktemp("learn")
    cases = load_cohort(learning_cohort)
    cfg = {
        "model": {"arch": "vit_tiny_patch16_224", "stem": "conv", "cell": 32, "depth": 2, "embed_dim": 96,
                  "num_heads": 3},
        "preprocess": {"n4": False, "smoothing": "none", "standardize": "minmax"},
        "train": {
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.05,
            "batch_size": 8,
            "epochs": 12,
            "warmup_epochs": 2,
            "schedule": "cosine",
            "windows_per_case": 4,
            "grad_clip": 1.0,
            "class_weights": "balanced",
            "select_metric": "loss",
            "val_windows": "central",
            "seed": 0,
        },
        "cv": {"outer": 3, "inner": 2, "seed": 0, "examples": 1},
        "data": {"cache_dir": str(base / "cache")},
    }
    out = run_cv(cases, cfg, base / "run", cohort_info={"synthetic": True})
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    acc = metrics["summary"]["accuracy"]
    loc = metrics["models"][0]["localisation"]["overall"]
    print(
        f"\nlearning test: outer accuracy {acc['mean']:.3f} ± {acc['std']:.3f} (ddof=1), "
        f"balanced {metrics['summary']['balanced_accuracy']['mean']:.3f}, "
        f"AUC {metrics['summary']['macro_auc']['mean']:.3f}, "
        f"pointing game {loc['pointing_hits']}/{loc['n']}"
    )
    assert out["complete"]
    lesion_cases = sum(c.label > 0 for c in cases)
    assert loc["n"] == lesion_cases  # every lesion-bearing outer test case was scored
    assert acc["mean"] >= 0.5  # chance is 1/3
