"""Splitting a cohort by patient: the train/validation split of ``ipmn train`` and the nested folds of ``ipmn cv``.

Outer folds: ``StratifiedGroupKFold`` over patients (a patient's cases never sit in two folds),
stratified by label — jointly by label and centre when the cohort has several centres — so every outer
test fold holds every class; ``leave_one_center_out`` makes one outer fold per centre instead
(external validation), and ``group_by: center`` keeps whole centres together. Inner folds split each
outer *training* set the same way. :func:`verify_splits` checks the invariants (no patient on both
sides, inner folds inside the outer training set) and raises on leakage.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError
from ipmn.io import write_json
from ipmn.vocab import CLASS_NAMES, class_name

SPLITS_VERSION = 1


def _strata(cases, use_center: bool) -> tuple[np.ndarray, str]:
    labels = np.array([c.label for c in cases])
    centers = sorted({c.center for c in cases if c.center})
    if use_center and len(centers) > 1:
        code = {c: i for i, c in enumerate(centers)}
        return labels * len(centers) + np.array([code.get(c.center, 0) for c in cases]), "label+center"
    return labels, "label"


def _groups(cases, group_by: str) -> np.ndarray:
    if group_by == "center":
        return np.array([c.center or "-" for c in cases])
    return np.array([c.patient_id or c.case_id for c in cases])


def check_class_groups(cases, groups, n_splits: int, flag: str, where: str) -> None:
    by_class: dict[int, set] = {}
    for c, g in zip(cases, groups, strict=True):
        by_class.setdefault(c.label, set()).add(g)
    if len(by_class) < 2:
        raise IPMNError(f"{where} has fewer than two classes ({[class_name(k) for k in by_class]}); "
                        "cross-validation of a classifier needs at least two")
    short = {k: len(v) for k, v in by_class.items() if len(v) < n_splits}
    if short:
        worst = min(short.values())
        unit = "patients" if flag != "--group-by center" else "centres"
        names = ", ".join(f"'{class_name(k)}' has {v} {unit}" for k, v in sorted(short.items()))
        opt = "--inner" if "inner" in where else "--outer"
        if worst >= 2:
            hint = f"use {opt} {worst} or fewer"
        elif opt == "--inner":
            hint = "use fewer outer folds (larger outer training sets) or add cases of that class"
        else:
            hint = "add cases of that class (at least two are needed)"
        raise IPMNError(
            f"{where}: class {names}, fewer than the {n_splits} folds asked for, so some test folds would miss it; "
            + hint
        )


def kfold(cases, n_splits: int, seed: int, group_by: str, use_center: bool, need_all_classes: bool):
    """StratifiedGroupKFold, retried with derived seeds until every test fold holds every class."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = _groups(cases, group_by)
    classes = {c.label for c in cases}
    tries = []
    options = [False]
    if use_center:
        joint, _ = _strata(cases, True)
        # joint label x centre strata only where every stratum can be spread over the folds
        if np.bincount(joint).max() > 0 and min(np.bincount(joint)[np.bincount(joint) > 0]) >= n_splits:
            options = [True, False]
    for strat_center in options:
        y, how = _strata(cases, strat_center)
        for attempt in range(20):
            rs = int(seed) * 1009 + attempt
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=rs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # class counts are checked with clearer messages
                folds = [(tr.tolist(), te.tolist()) for tr, te in sgkf.split(np.zeros(len(cases)), y, groups)]
            missing = sum(len(classes - {cases[i].label for i in te}) for _, te in folds)
            tries.append((missing, folds, how, attempt))
            if missing == 0 or not need_all_classes:
                return folds, how, attempt
    missing, folds, how, attempt = min(tries, key=lambda t: t[0])
    return folds, how, attempt


def make_splits(cases, outer: int = 10, inner: int = 3, seed: int = 0, group_by: str = "patient",
                leave_one_center_out: bool = False, stratify_center: bool = True) -> dict:
    """Nested, patient-level splits as a JSON-able dict (case ids, not indices)."""
    cases = list(cases)
    if not cases:
        raise IPMNError("the cohort has no cases")
    centers = sorted({c.center for c in cases if c.center})
    if leave_one_center_out:
        if len(centers) < 2:
            raise IPMNError("--leave-one-center-out needs a 'center' column with at least two centres "
                            f"(found {centers or 'none'})")
        if any(not c.center for c in cases):
            raise IPMNError("--leave-one-center-out: some cases have no centre")
        outer = len(centers)
        check_class_groups(cases, _groups(cases, "patient"), 1, "--outer", "the cohort")
        outer_folds = [([i for i, c in enumerate(cases) if c.center != ctr], [i for i, c in enumerate(cases) if c.center == ctr])
                       for ctr in centers]
        how, attempt = "centre", 0
    else:
        if group_by == "center" and len(centers) < outer:
            raise IPMNError(f"--group-by center with --outer {outer} needs at least {outer} centres (found {len(centers)})")
        check_class_groups(cases, _groups(cases, group_by), outer,
                            "--group-by center" if group_by == "center" else "--outer", "the cohort")
        outer_folds, how, attempt = kfold(cases, outer, seed, group_by, stratify_center, True)
    folds = []
    for k, (tr, te) in enumerate(outer_folds):
        # patient guard: with centre-level folds a patient scanned at two centres must not train and test
        test_patients = {cases[i].patient_id or cases[i].case_id for i in te}
        dropped = [cases[i].case_id for i in tr if (cases[i].patient_id or cases[i].case_id) in test_patients]
        tr = [i for i in tr if (cases[i].patient_id or cases[i].case_id) not in test_patients]
        train_cases = [cases[i] for i in tr]
        check_class_groups(train_cases, _groups(train_cases, "patient"), inner, "--inner",
                            f"the training set of outer fold {k} (inner folds)")
        inner_folds, inner_how, inner_attempt = kfold(train_cases, inner, seed * 7919 + k + 1, "patient",
                                                       stratify_center, True)
        fold = {
            "fold": k,
            "train": [cases[i].case_id for i in tr],
            "test": [cases[i].case_id for i in te],
            "inner": [{"train": [train_cases[i].case_id for i in itr], "val": [train_cases[i].case_id for i in ite]}
                      for itr, ite in inner_folds],
            "inner_stratified_by": inner_how,
        }
        if dropped:
            fold["excluded_from_train"] = dropped
        if leave_one_center_out:
            fold["test_center"] = centers[k]
        folds.append(fold)
    splits = {
        "version": SPLITS_VERSION,
        "seed": int(seed),
        "outer": int(outer),
        "inner": int(inner),
        "group_by": "center (leave one out)" if leave_one_center_out else group_by,
        "leave_one_center_out": bool(leave_one_center_out),
        "stratified_by": how,
        "retries": int(attempt),
        "cases": [{"case_id": c.case_id, "label": int(c.label), "patient_id": c.patient_id or c.case_id,
                   "center": c.center} for c in cases],
        "folds": folds,
    }
    names = next((c.extra["class_names"] for c in cases if (getattr(c, "extra", None) or {}).get("class_names")), None)
    if names:  # e.g. the 2-class task (ipmn.cystx.apply_label_task)
        splits["class_names"] = list(names)
    verify_splits(splits)
    return splits


def verify_splits(splits: dict) -> list[str]:
    """Invariants (raise on leakage): no patient in two outer test folds, test ∩ train = ∅ at both levels,
    inner folds inside the outer training set. Returns warnings (e.g. a test fold missing a class)."""
    info = {c["case_id"]: c for c in splits["cases"]}
    seen_patient: dict[str, int] = {}
    warnings = []
    all_labels = {c["label"] for c in splits["cases"]}
    for fold in splits["folds"]:
        k = fold["fold"]
        test, train = set(fold["test"]), set(fold["train"])
        if test & train:
            raise IPMNError(f"splits: fold {k} has cases in both train and test")
        tp = {info[c]["patient_id"] for c in test}
        if tp & {info[c]["patient_id"] for c in train}:
            raise IPMNError(f"splits: fold {k} has a patient in both train and test")
        for p in tp:
            if p in seen_patient:
                raise IPMNError(f"splits: patient {p} is in the test sets of folds {seen_patient[p]} and {k}")
            seen_patient[p] = k
        for j, inn in enumerate(fold["inner"]):
            used = set(inn["train"]) | set(inn["val"])
            if used & test:
                raise IPMNError(f"splits: inner fold {j} of outer fold {k} touches the outer test fold")
            if not used <= train:
                raise IPMNError(f"splits: inner fold {j} of outer fold {k} uses cases outside the outer training set")
        missing = all_labels - {info[c]["label"] for c in test}
        if missing and not splits.get("leave_one_center_out"):
            names = splits.get("class_names") or [class_name(m) for m in range(max(all_labels) + 1)]
            warnings.append(f"outer test fold {k} has no {', '.join(names[m] for m in sorted(missing))} case")
    return warnings


def load_or_make_splits(run_dir: Path, cases, cv: dict, splits: dict | None = None) -> dict:
    """The run's splits.json (checked against the cohort), or new splits written there first."""
    path = Path(run_dir) / "splits.json"
    ids = [c.case_id for c in cases]
    if path.exists():
        splits = json.loads(path.read_text(encoding="utf-8"))
        stored = [c["case_id"] for c in splits["cases"]]
        if stored != ids or [c["label"] for c in splits["cases"]] != [int(c.label) for c in cases]:
            raise IPMNError(f"{path} was made for a different cohort; use another --out or --overwrite")
        return splits
    if splits is None:
        splits = make_splits(cases, cv["outer"], cv["inner"], cv["seed"], cv["group_by"], cv["leave_one_center_out"],
                             cv["stratify_center"])
    write_json(splits, path)
    return splits


def fold_counts(splits: dict, class_names=None) -> list[dict]:
    """Per outer fold: class counts of train and test (for the report)."""
    labels = {c["case_id"]: c["label"] for c in splits["cases"]}
    rows = []
    for f in splits["folds"]:
        tr, te = Counter(labels[i] for i in f["train"]), Counter(labels[i] for i in f["test"])
        classes = sorted(set(tr) | set(te))
        rows.append({"fold": f["fold"], "train": {class_name(c, class_names or CLASS_NAMES): tr.get(c, 0) for c in classes},
                     "test": {class_name(c, class_names or CLASS_NAMES): te.get(c, 0) for c in classes},
                     "test_center": f.get("test_center")})
    return rows


def split_validation(cases, fraction: float = 0.1, seed: int = 0):
    """Patient-grouped, label-stratified train/validation split (``fraction`` of the patients)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < fraction < 1:
        raise IPMNError(f"--val-fraction must be between 0 and 1 (got {fraction})")
    n_splits = max(2, int(round(1.0 / fraction)))
    labels = np.array([c.label for c in cases])
    groups = np.array([c.patient_id or c.case_id for c in cases])
    if len(set(groups.tolist())) < n_splits:
        raise IPMNError(
            f"--val-fraction {fraction} needs at least {n_splits} patients; the cohort has {len(set(groups.tolist()))}"
        )
    counts = np.bincount(labels)
    y = labels if counts[counts > 0].min() >= n_splits else np.zeros_like(labels)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tr, va = next(sgkf.split(np.zeros(len(cases)), y, groups))
    return [cases[i] for i in tr], [cases[i] for i in va]


def pick_cases(cases, ids) -> tuple[list, list]:
    """(cases whose id is in ``ids``, the rest); unknown ids raise one error listing them."""
    ids = list(ids)
    known = {c.case_id for c in cases}
    missing = [i for i in ids if i not in known]
    if missing:
        raise IPMNError(f"--val-cases: unknown case id(s) {missing[:10]}")
    chosen = set(ids)
    return [c for c in cases if c.case_id in chosen], [c for c in cases if c.case_id not in chosen]


def check_labels(cases, num_classes: int, what: str = "the training set") -> None:
    present = sorted({c.label for c in cases})
    if len(present) < 2:
        names = [class_name(i) for i in present]
        raise IPMNError(f"{what} has fewer than two classes ({names or 'no cases'}); a classifier needs at least two")
    too_big = [c.case_id for c in cases if c.label >= num_classes]
    if too_big:
        raise IPMNError(f"case(s) {too_big[:5]} have labels outside the model's {num_classes} classes")
