"""The Cyst-X release reader, its official folds and the readers comparison, on a small replica.

The replica is written here: scans named with every centre alias and id pattern of the release, the
three xlsx label tables at the official column positions (and a variant with header names in another
order), T2 scans named differently from their T1 scans, empty-risk rows, a scan of no centre, and the
split CSVs. The expected cohorts and folds come from a second implementation written like the official
Cyst-X loaders (rows after the header, ``dropna`` on the risk, centre = the first group whose alias is in
the name, per-centre ``StratifiedKFold(shuffle=False)``), not from ``ipmn.cystx``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest

openpyxl = pytest.importorskip("openpyxl")
sitk = pytest.importorskip("SimpleITK")

from ipmn.cohort import load_cohort, summarize  # noqa: E402
from ipmn.errors import IPMNError  # noqa: E402

OFFICIAL_GROUPS = [["nyu"], ["CAD", "MCF"], ["northwestern", "NU"], ["AHN", "ahn"], ["mca"], ["IU"], ["EMC"]]
GROUP_NAMES = ["nyu", "CAD+MCF", "northwestern+NU", "AHN", "mca", "IU", "EMC"]
# six scans per centre, every alias and id pattern of the release (AHN05, EMC007 beside EMC_01_002, IU_2 ...)
T1_IDS = [
    *[f"nyu_{i:04d}" for i in (1, 3, 4, 8, 9, 10)],
    "CAD_03", "CAD_102", "CAD_28", "MCF_04", "MCF_05", "MCF_10",
    "northwestern_0001", "northwestern_0002", "NU_03", "NU_05", "NU_101", "NU_06",
    "AHN05", "AHN09", "AHN11", "ahn12", "ahn16", "AHN21",
    "mca_05", "mca_10", "mca_124", "mca_126", "mca_138", "mca_14",
    "IU_2", "IU_3", "IU_5", "IU_7", "IU_8", "IU_9",
    "EMC_01_002", "EMC_01_004", "EMC007", "EMC009", "EMC010", "EMC011",
]  # fmt: skip
RISKS = [0, 1, 2, 1, 2, 0]  # per centre: two of each grade


def t2_name(t1: str, i: int) -> str:
    """T2 scans have their own names: a '_1' suffix, or another numbering altogether."""
    return f"{t1}_1" if i % 3 == 0 else (f"EMC_02_{i:03d}" if t1.startswith("EMC0") else t1)


def _write_scan(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.normal(size=(4, 12, 12)).astype(np.float32))
    sitk.WriteImage(img, str(path))


def _write_mask(path) -> None:
    m = np.zeros((4, 12, 12), np.uint8)
    m[1:3, 3:8, 4:9] = 1
    sitk.WriteImage(sitk.GetImageFromArray(m), str(path))


def _xlsx(path, rows) -> None:
    wb = openpyxl.Workbook()
    for r in rows:
        wb.active.append(r)
    wb.save(path)


def make_release(root, headered: bool = False):
    """The replica; returns the rows it wrote (the reference reads them back from the files)."""
    data = root / "dataset"
    for m in ("t1", "t2"):
        for kind in ("images", "masks"):
            (data / "IPMN_images_masks" / m / kind).mkdir(parents=True, exist_ok=True)
    tables = data / "IPMN_Classification"
    tables.mkdir(parents=True)
    pairs = []
    for i, t1 in enumerate(T1_IDS):
        t2 = t2_name(t1, i)
        risk = RISKS[i % 6]
        pairs.append((t1, t2, risk))
        for m, name in (("t1", t1), ("t2", t2)):
            _write_scan(data / "IPMN_images_masks" / m / "images" / f"{name}.nii.gz", i)
            _write_mask(data / "IPMN_images_masks" / m / "masks" / f"{name}.nii.gz")
    # rows the official code drops: empty risk, and a name of no centre (its files exist)
    extra = [("nyu_0050", "nyu_0050", None), ("IU_40", "IU_40_1", None), ("xyz_001", "xyz_001", 2)]
    for t1, t2, _ in extra:
        for m, name in (("t1", t1), ("t2", t2)):
            _write_scan(data / "IPMN_images_masks" / m / "images" / f"{name}.nii.gz", 99)
            _write_mask(data / "IPMN_images_masks" / m / "masks" / f"{name}.nii.gz")
    rows = pairs[:20] + extra + pairs[20:]
    if headered:  # header names identify the columns, which sit elsewhere than the official positions
        t1_rows = [["Age", "Patient ID", "Risk", "Sex"]] + [[60, f"{a}.nii.gz", r, "F"] for a, _, r in rows]
        t2_rows = [["Age", "Patient ID", "Risk", "Sex"]] + [[60, f"{b}.nii.gz", r, "F"] for _, b, r in rows]
        paired = [["Risk assessment", "Patient ID T2", "note", "Patient ID T1", "follow-up information"]] + [
            [r, f"{b}.nii.gz", "", f"{a}.nii.gz", ""] for a, b, r in rows]
    else:  # official positions: 0 name, 5 risk; paired 0 T1, 1 T2, 6 risk; the header row says nothing useful
        t1_rows = [["c0", "c1", "c2", "c3", "c4", "c5"]] + [[f"{a}.nii.gz", 1, 2, 3, 4, r] for a, _, r in rows]
        t2_rows = [["c0", "c1", "c2", "c3", "c4", "c5"]] + [[f"{b}.nii.gz", 1, 2, 3, 4, r] for _, b, r in rows]
        paired = [["first", "second", "c", "d", "e", "f", "g"]] + [
            [f"{a}.nii.gz", f"{b}.nii.gz", "x", "y", "z", "w", r] for a, b, r in rows]
    _xlsx(tables / "IPMN_labels_t1_total.xlsx", t1_rows)
    _xlsx(tables / "IPMN_labels_t2_total.xlsx", t2_rows)
    _xlsx(tables / "IPMN_labels_total.xlsx", paired)
    return data


# ------------------------------------------------------------------------------------------------ the reference
def official_list(xlsx, cols, group: int, two_class: bool):
    """Like the official get_data_list(center=group): names (first name column) and labels, table order."""
    ws = openpyxl.load_workbook(xlsx, read_only=True).worksheets[0]
    rows = [list(r) for r in ws.iter_rows(values_only=True)][1:]  # pandas: the first row is the header
    out = []
    for r in rows:
        if r[cols[-1]] is None:  # dropna on the risk column
            continue
        names = [r[c].replace(".nii.gz", "") for c in cols[:-1]]
        label = int(r[cols[-1]]) // 2 if two_class else int(r[cols[-1]])
        if any(alias in names[0] for alias in OFFICIAL_GROUPS[group]):
            out.append((names, label))
    return out


def official_folds(xlsx, cols, n_splits: int, two_class: bool, pooled: bool = False):
    """Test ids of each fold as the official loaders make them: StratifiedKFold(shuffle=False) per centre
    (2-class, "stratified center-wise") or over all centres at once (3-class, "pooled")."""
    from sklearn.model_selection import StratifiedKFold

    folds = [set() for _ in range(n_splits)]
    for g in ([None] if pooled else range(len(OFFICIAL_GROUPS))):
        lst = (sorted((x for h in range(7) for x in official_list(xlsx, cols, h, two_class)),
                      key=lambda x: T1_IDS.index(x[0][0])) if g is None else official_list(xlsx, cols, g, two_class))
        labels = [lab for _, lab in lst]
        for k, (_, te) in enumerate(StratifiedKFold(n_splits=n_splits, shuffle=False).split(lst, labels)):
            folds[k].update(lst[i][0][0] for i in te)
    return folds


def official_summary(xlsx, cols, two_class: bool):
    per_center, per_class = {}, Counter()
    for g, name in enumerate(GROUP_NAMES):
        lst = official_list(xlsx, cols, g, two_class)
        if lst:
            per_center[name] = len(lst)
        per_class.update(lab for _, lab in lst)
    return per_center, per_class


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("cystx"))


# ------------------------------------------------------------------------------------------------ cohorts
@pytest.mark.parametrize("mods,table,cols", [(("t1",), "IPMN_labels_t1_total.xlsx", (0, 5)),
                                             (("t2",), "IPMN_labels_t2_total.xlsx", (0, 5)),
                                             (("t1", "t2"), "IPMN_labels_total.xlsx", (0, 1, 6))])
def test_cohort_matches_official_loaders(release, mods, table, cols):
    cases = load_cohort(release, mods)  # the dataset/ folder itself
    xlsx = release / "IPMN_Classification" / table
    per_center, per_class = official_summary(xlsx, cols, two_class=False)
    s = summarize(cases)
    assert s["per_center"] == per_center
    assert s["per_class"] == {"normal": per_class[0], "low": per_class[1], "high": per_class[2]}
    # the official lists, id by id, with their labels
    expected = {names[0]: lab for g in range(7) for names, lab in official_list(xlsx, cols, g, False)}
    assert {c.case_id: c.label for c in cases} == expected
    assert "xyz_001" not in expected and "nyu_0050" not in expected  # no centre / empty risk
    notes = " ".join(s["notes"])
    assert "empty risk" in notes and "no centre" in notes and "no patient column" in notes


def test_t1_t2_paired_by_table_not_by_name(release):
    cases = {c.case_id: c for c in load_cohort(release.parent, ("t1", "t2"))}  # the folder above dataset/ works too
    for i, t1 in enumerate(T1_IDS):
        c = cases[t1]
        assert c.t1.name == f"{t1}.nii.gz"
        assert c.t2.name == f"{t2_name(t1, i)}.nii.gz" and c.t2.parent.parent.name == "t2"
        assert c.mask.parent.parent.name == "t1" and c.roi is None
        assert c.label == RISKS[i % 6]
    assert sum(c.t2.stem != c.t1.stem for c in cases.values()) >= 12  # names really differ


def test_centre_aliases_are_merged(release):
    by_id = {c.case_id: c.center for c in load_cohort(release, ("t1",))}
    assert by_id["CAD_03"] == by_id["MCF_04"] == "CAD+MCF"
    assert by_id["northwestern_0001"] == by_id["NU_03"] == "northwestern+NU"
    assert by_id["AHN05"] == by_id["ahn12"] == "AHN"
    assert by_id["EMC007"] == by_id["EMC_01_002"] == "EMC"
    assert by_id["IU_2"] == "IU" and by_id["mca_05"] == "mca" and by_id["nyu_0001"] == "nyu"
    assert len(set(by_id.values())) == 7


def test_patients_link_t2_scans_to_their_t1_row(release):
    t2 = {c.case_id: c for c in load_cohort(release, ("t2",))}
    for i, t1 in enumerate(T1_IDS):
        assert t2[t2_name(t1, i)].patient_id == t1
    both = load_cohort(release, ())  # several modality sets: paired cases, no scan twice
    assert len(both) == len(T1_IDS) and all(c.t1 is not None and c.t2 is not None for c in both)


def test_headered_tables_and_csv_export(tmp_path, release):
    data = make_release(tmp_path / "h", headered=True)
    for mods in (("t1",), ("t2",), ("t1", "t2")):
        a = {(c.case_id, c.label, c.center, c.t1, c.t2) for c in load_cohort(release, mods)}
        b = {(c.case_id, c.label, c.center) for c in load_cohort(data, mods)}
        assert {x[:3] for x in a} == b
    notes = summarize(load_cohort(data, ("t1", "t2")))["notes"]
    assert any("by header" in n and "Risk assessment" in n for n in notes)
    # the T1 table as a CSV export instead of the xlsx
    ws = openpyxl.load_workbook(data / "IPMN_Classification" / "IPMN_labels_t1_total.xlsx").worksheets[0]
    with open(data / "IPMN_Classification" / "IPMN_labels_t1_total.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["" if v is None else v for v in r] for r in ws.iter_rows(values_only=True)])
    (data / "IPMN_Classification" / "IPMN_labels_t1_total.xlsx").unlink()
    assert {c.case_id for c in load_cohort(data, ("t1",))} == {c.case_id for c in load_cohort(release, ("t1",))}


def test_unreadable_table_is_one_clear_error(tmp_path):
    data = make_release(tmp_path / "bad")
    _xlsx(data / "IPMN_Classification" / "IPMN_labels_t1_total.xlsx", [["Who", "When"], ["someone", "today"]])
    with pytest.raises(IPMNError, match=r"IPMN_labels_t1_total.xlsx.*official positions.*\['Who', 'When'\]"):
        load_cohort(data, ("t1",))


def test_two_class_labels(release):
    from ipmn.cystx import apply_label_task, task_for

    assert task_for(None, "cystx-2class") == "2class" and task_for(None, None) == "3class"
    with pytest.raises(IPMNError, match="was made for the 2-class task"):
        task_for("3class", "cystx-2class")
    cases = apply_label_task(load_cohort(release, ("t1",)), "2class")
    _, per_class = official_summary(release / "IPMN_Classification" / "IPMN_labels_t1_total.xlsx", (0, 5), True)
    assert summarize(cases)["per_class"] == {"no/low risk": per_class[0], "high risk": per_class[1]}


# ------------------------------------------------------------------------------------------------ official folds
def _write_split(path, folds: list[set], per_fold_columns: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if per_fold_columns:
            w.writerow(["Patient ID", *[f"fold_{k}" for k in range(len(folds))]])
            for k, ids in enumerate(folds):
                for i in sorted(ids):
                    w.writerow([f"{i}.nii.gz", *["test" if j == k else "train" for j in range(len(folds))]])
        else:
            w.writerow(["image", "center", "fold"])
            for k, ids in enumerate(folds):
                for i in sorted(ids):
                    w.writerow([i, "?", k + 1])  # 1-based on purpose


@pytest.mark.parametrize("name,per_fold", [("cystx-2class", False), ("cystx-3class", True)])
def test_official_folds_are_the_outer_folds(tmp_path, name, per_fold):
    from ipmn.cystx import apply_label_task, task_for
    from ipmn.cystx_splits import official_cv_splits
    from ipmn.splits import verify_splits

    data = make_release(tmp_path / "r")
    xlsx = data / "IPMN_Classification" / "IPMN_labels_t1_total.xlsx"
    two = name == "cystx-2class"
    folds = official_folds(xlsx, (0, 5), 4 if two else 5, two, pooled=not two)
    _write_split(data / "data splits" / "classification" / ("2-class" if two else "3-class") / "t1.csv", folds, per_fold)
    cases = apply_label_task(load_cohort(data, ("t1",)), task_for(None, name))
    cv = {"inner": 2, "seed": 0, "stratify_center": True, "group_by": "patient", "leave_one_center_out": False}
    kept, splits, warnings = official_cv_splits(data, cases, name, {("t1",)}, cv, tmp_path / "run", False)
    assert [set(f["test"]) for f in splits["folds"]] == folds
    all_ids = {c.case_id for c in kept}
    for f in splits["folds"]:
        assert set(f["train"]) == all_ids - set(f["test"])
        assert len(f["inner"]) == 2
    verify_splits(splits)  # raises on leakage; a fold without high cases is only a warning
    assert splits["outer"] == len(folds)
    assert ("2-class/t1.csv" if two else "3-class/t1.csv") in splits["source"]
    assert not warnings
    # another split set in the same run folder is refused
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "splits.json").write_text(json.dumps({"source": None, "folds": []}))
    with pytest.raises(IPMNError, match="holds other splits"):
        official_cv_splits(data, cases, name, {("t1",)}, cv, tmp_path / "run", False)


def test_split_file_refusals(tmp_path, capsys):
    from ipmn.cli import main

    data = make_release(tmp_path / "r")
    split = data / "data splits" / "classification" / "2-class" / "t1.csv"
    split.parent.mkdir(parents=True)
    split.write_text("subject,partition_name\nnyu_0001,A\n")
    rc = main(["cv", "--cohort", str(data), "--out", str(tmp_path / "run"), "--splits", "cystx-2class",
               "--modalities", "t1", "--config", "demo", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot recognise an id column and a fold column" in err and "'partition_name'" in err
    rc = main(["cv", "--cohort", str(data), "--out", str(tmp_path / "run"), "--splits", "cystx-3class",
               "--modalities", "t1t2", "--config", "demo", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "no official split file for T1+T2" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ readers
def _fake_run(run, ids, truth, probs, names, patient_of=None):
    """A finished two-fold cv run folder holding the given test predictions."""
    from ipmn.metrics import classification_metrics

    run.mkdir(parents=True)
    half = len(ids) // 2
    cases = [{"case_id": i, "label": int(t), "patient_id": (patient_of or {}).get(i, i), "center": ""}
             for i, t in zip(ids, truth, strict=True)]
    (run / "run.json").write_text(json.dumps({"kind": "ipmn-cv", "variants_full": [
        {"name": "m", "label": "m", "arch": "a", "modalities": ["t1"], "fusion": "early",
         "model": {"class_names": names}}]}))
    folds = [{"fold": 0, "test": ids[:half], "train": ids[half:], "inner": []},
             {"fold": 1, "test": ids[half:], "train": ids[:half], "inner": []}]
    (run / "splits.json").write_text(json.dumps({"outer": 2, "inner": 2, "seed": 0, "group_by": "patient",
                                                 "stratified_by": "label", "cases": cases, "folds": folds}))
    for k, sl in enumerate((slice(0, half), slice(half, None))):
        y, p = np.array(truth[sl]), np.array(probs[sl])
        m = classification_metrics(y, p, len(names))
        res = {"fold": k, "metrics": m, "metrics_calibrated": m, "selected": {"epoch": 1, "lr": 1e-3},
               "temperature": 1.0, "n_train": 1, "n_test": len(y), "inner_curves": [], "examples": [],
               "predictions": [{"case_id": i, "true": int(t), "probs": list(map(float, q)),
                                "probs_calibrated": list(map(float, q))}
                               for i, t, q in zip(ids[sl], y, p, strict=True)]}
        (run / "m" / f"fold_{k}").mkdir(parents=True)
        (run / "m" / f"fold_{k}" / "result.json").write_text(json.dumps(res))


def test_readers_on_exactly_the_tested_patients(tmp_path, capsys):
    from sklearn.metrics import confusion_matrix, recall_score

    from ipmn.cli import main

    rng = np.random.default_rng(3)
    ids = [f"nyu_{i:04d}" for i in range(40)]
    truth = [i % 3 for i in range(40)]
    probs = rng.dirichlet(np.ones(3), size=40)
    probs[np.arange(40), truth] += 0.6 * (rng.random(40) < 0.7)  # a model right about 70% of the time
    probs /= probs.sum(axis=1, keepdims=True)
    _fake_run(tmp_path / "run", ids, truth, probs, ["normal", "low", "high"])
    # readers: A is always right, B calls everyone low; one id the model never saw, one tested case not read
    table = tmp_path / "readers.csv"
    lines = ["Patient ID,Ground_truth_Risk_Assessment,readerA,readerB"]
    lines += [f"{i}.nii.gz,{t},{t},1" for i, t in zip(ids[1:], truth[1:], strict=True)]
    lines += ["EMC999,2,2,1"]
    table.write_text("\n".join(lines) + "\n")
    assert main(["cv-report", str(tmp_path / "run"), "--readers", str(table), "--progress", "none"]) == 0
    capsys.readouterr()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["readers"]["models"][0]
    assert m["n_matched"] == 39 and m["unmatched_reader_ids"] == ["EMC999"] and m["tested_without_reads"] == [ids[0]]
    a, b = m["readers"]["readerA"], m["readers"]["readerB"]
    assert a["accuracy"] == 1.0 and a["sensitivity_high"] == 1.0 and a["specificity_high"] == 1.0
    y = np.array(truth[1:])
    assert b["accuracy"] == pytest.approx(np.mean(y == 1)) and b["sensitivity_high"] == 0.0
    assert b["specificity_high"] == 1.0
    pred = probs[1:].argmax(axis=1)
    assert m["model"]["recall"]["low"] == pytest.approx(recall_score(y, pred, labels=[1], average="macro"))
    tn, fp, fn, tp = confusion_matrix(y == 2, pred == 2).ravel()
    assert m["model"]["sensitivity_high"] == pytest.approx(tp / (tp + fn))
    assert m["model"]["specificity_high"] == pytest.approx(tn / (tn + fp))
    # reader B sits at specificity 1: the model's sensitivity there is the best TPR at FPR 0
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y == 2, probs[1:, 2])
    assert b["model_sensitivity_at_reader_specificity"] == pytest.approx(tpr[fpr == 0].max())
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Model vs readers" in html and "EMC999" in html and "readerB" in html
    # the table stays with the run: a later report without --readers keeps the comparison
    assert main(["cv-report", str(tmp_path / "run"), "--progress", "none"]) == 0
    assert "readers" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_readers_two_class_and_bad_table(tmp_path, capsys):
    from ipmn.cli import main
    from ipmn.readers import compare_model, load_readers

    table = tmp_path / "r.csv"
    table.write_text("Patient ID,Ground_truth_Risk_Assessment,reader1\nA,2,1\nB,1,2\nC,0,0\nD,2,2\n")
    preds = [{"case_id": i, "true": t, "probs": p} for i, t, p in
             (("A", 1, [0.2, 0.8]), ("B", 0, [0.7, 0.3]), ("C", 0, [0.9, 0.1]), ("D", 1, [0.6, 0.4]))]
    out = compare_model(preds, {}, load_readers(table), ["no/low risk", "high risk"])
    r = out["readers"]["reader1"]  # grades // 2: A read 0 (missed), B read 1 (false alarm), D read 1
    assert r["sensitivity_high"] == 0.5 and r["specificity_high"] == 0.5 and r["accuracy"] == 0.5
    assert out["model"]["sensitivity_high"] == 0.5 and out["model"]["specificity_high"] == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\nA,1\n")
    _fake_run(tmp_path / "run", ["A", "B"], [0, 1], [[0.9, 0.1], [0.2, 0.8]], ["no/low risk", "high risk"])
    assert main(["cv-report", str(tmp_path / "run"), "--readers", str(bad), "--progress", "none"]) == 2
    assert "cannot recognise a patient id column" in capsys.readouterr().err


def test_two_class_own_splits_name_the_classes(release):
    from ipmn.cystx import apply_label_task
    from ipmn.splits import fold_counts, make_splits

    cases = apply_label_task(load_cohort(release, ("t1",)), "2class")
    splits = make_splits(cases, outer=3, inner=2, seed=0)
    assert splits["class_names"] == ["no/low risk", "high risk"]
    rows = fold_counts(splits, splits["class_names"])
    assert sum(r["test"]["high risk"] for r in rows) == sum(c.label == 1 for c in cases) == 14
