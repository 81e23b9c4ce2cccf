"""The Cyst-X release's official cross-validation folds as ipmn's outer folds (``ipmn cv --splits``).

``data splits/classification/3-class/{t1,t2}.csv`` (5 folds) and ``2-class/{t1,t2,two_inputs}.csv`` (4
folds, centre-wise). Their columns are not documented, so they are read by header: an id column and
either one fold column (fold numbers, any base) or one column per fold holding train/test. The inner
folds (epoch, temperature) stay ipmn's, inside each official training set.
"""

from __future__ import annotations

import re
from pathlib import Path

from ipmn.cohort import Case
from ipmn.cystx import SPLITS, Release, _norm, find_release, read_rows, scan_stem
from ipmn.errors import IPMNError

_SPLIT_ID = re.compile(r"\b(id|ids|name|file|filename|image|img|case|patient|scan|path|t1|t2)\b")
_SPLIT_FOLD = re.compile(r"^(fold|folds|fold id|fold index|split|cv|cv fold|partition)$")
_FOLD_N = re.compile(r"^fold ?(\d+)$")


def split_file(release: Release, name: str, modalities) -> Path:
    """``data splits/classification/<task>/{t1,t2,two_inputs}.csv`` for ``--splits NAME``."""
    if name not in SPLITS:
        raise IPMNError(f"--splits must be one of {list(SPLITS)} (got {name!r})")
    stem = {("t1",): "t1", ("t2",): "t2", ("t1", "t2"): "two_inputs"}.get(tuple(modalities))
    folder = release.splits / SPLITS[name]
    have = sorted(p.name for p in folder.glob("*.csv")) if folder.is_dir() else []
    if stem is None or not (folder / f"{stem}.csv").is_file():
        what = "+".join(m.upper() for m in modalities) or "several modality sets"
        raise IPMNError(f"--splits {name}: no official split file for {what} in {folder} (found {have or 'none'}); "
                        "the release has 3-class folds for T1 and T2 alone, 2-class folds for T1, T2 and T1+T2")
    return folder / f"{stem}.csv"


def read_split_file(path: Path, modalities=("t1",)) -> dict:
    """``{scan stem: fold index}`` from an id column and either one fold column (numbers) or per-fold
    columns (``fold_0`` ... holding train/test). Refused with the header listed when neither is found."""
    rows = read_rows(path)
    header = [str(h or "") for h in (rows[0] if rows else [])]
    names = [_norm(h) for h in header]
    folds = [i for i, h in enumerate(names) if _SPLIT_FOLD.match(h)]
    per_fold = [i for i, h in enumerate(names) if _FOLD_N.match(h)]
    ids = [i for i, h in enumerate(names) if _SPLIT_ID.search(h) and i not in folds + per_fold]
    prefer = [i for i in ids if modalities and modalities[0] in names[i].split()]
    id_col = (prefer or ids or [None])[0]
    body = [r for r in rows[1:] if any(c is not None for c in r)]
    out: dict[str, object] = {}
    if id_col is not None and len(folds) == 1:
        col = folds[0]
        for n, r in enumerate(body, start=2):
            raw = r[col] if col < len(r) else None
            m = re.search(r"(\d+)\s*$", str(raw)) if raw is not None else None
            if not m:
                raise IPMNError(f"{path} row {n}: fold {raw!r} in column '{header[col]}' is not a fold number")
            out[scan_stem(r[id_col])] = int(m.group(1))
        how = f"id column '{header[id_col]}', fold column '{header[col]}'"
    elif id_col is not None and len(per_fold) >= 2:
        for n, r in enumerate(body, start=2):
            test = [int(_FOLD_N.match(names[i]).group(1)) for i in per_fold
                    if i < len(r) and str(r[i] or "").strip().lower() in ("test", "testing")]
            if len(test) != 1:
                raise IPMNError(f"{path} row {n}: 'test' in {len(test)} fold column(s); each scan needs exactly one")
            out[scan_stem(r[id_col])] = test[0]
        how = f"id column '{header[id_col]}', test marked in {[header[i] for i in per_fold]}"
    else:
        raise IPMNError(f"{path}: cannot recognise an id column and a fold column in its header {header}; expected "
                        "e.g. 'image,fold' (fold numbers) or 'image,fold_0,fold_1,...' (train/test)")
    order = sorted(set(out.values()))
    index = {v: k for k, v in enumerate(order)}
    return {"fold_of": {k: index[v] for k, v in out.items()}, "n_folds": len(order), "read": how,
            "fold_labels": order}


def _fold_of_case(case: Case, fold_of: dict):
    for key in (case.case_id, case.extra.get("t1_id"), case.extra.get("t2_id")):
        if key is not None and key in fold_of:
            return fold_of[key]
    return None


def official_splits(cases, table: dict, source: str, inner: int, seed: int, stratify_center: bool = True) -> dict:
    """Splits in ``ipmn.cv``'s format with the official folds as outer folds; inner folds are ours
    (patient-grouped, stratified) inside each outer training set."""
    from ipmn.splits import SPLITS_VERSION, check_class_groups, kfold, verify_splits

    fold_ids = [_fold_of_case(c, table["fold_of"]) for c in cases]
    folds = []
    for k in range(table["n_folds"]):
        te = [i for i, f in enumerate(fold_ids) if f == k]
        if not te:
            raise IPMNError(f"{source}: official fold {table['fold_labels'][k]} holds none of this cohort's cases")
        test_patients = {cases[i].patient_id or cases[i].case_id for i in te}
        tr_all = [i for i, f in enumerate(fold_ids) if f != k]
        tr = [i for i in tr_all if (cases[i].patient_id or cases[i].case_id) not in test_patients]
        train_cases = [cases[i] for i in tr]
        check_class_groups(train_cases, [c.patient_id or c.case_id for c in train_cases], inner, "--inner",
                            f"the training set of official fold {k} (inner folds)")
        inner_folds, inner_how, _ = kfold(train_cases, inner, seed * 7919 + k + 1, "patient", stratify_center, True)
        fold = {"fold": k, "train": [cases[i].case_id for i in tr], "test": [cases[i].case_id for i in te],
                "inner": [{"train": [train_cases[i].case_id for i in a], "val": [train_cases[i].case_id for i in b]}
                          for a, b in inner_folds],
                "inner_stratified_by": inner_how, "official_fold": table["fold_labels"][k]}
        if len(tr) < len(tr_all):
            fold["excluded_from_train"] = [cases[i].case_id for i in tr_all if i not in tr]
        folds.append(fold)
    splits = {"version": SPLITS_VERSION, "seed": int(seed), "outer": table["n_folds"], "inner": int(inner),
              "group_by": "patient", "leave_one_center_out": False, "stratified_by": "the Cyst-X release's folds",
              "retries": 0, "source": source,
              "cases": [{"case_id": c.case_id, "label": int(c.label), "patient_id": c.patient_id or c.case_id,
                         "center": c.center} for c in cases],
              "folds": folds}
    names = next((c.extra["class_names"] for c in cases if c.extra.get("class_names")), None)
    if names:
        splits["class_names"] = list(names)
    verify_splits(splits)
    return splits


def official_cv_splits(cohort, cases, name: str, modality_sets, cv: dict, run_dir: Path, overwrite: bool,
                       outer_flag: int | None = None) -> tuple[list, dict, list[str]]:
    """For ``ipmn cv --splits NAME``: the cases found in the official split file, the splits, and warnings."""
    import json

    release = find_release(cohort)
    if release is None:
        raise IPMNError(f"--splits {name} needs the Cyst-X release folder as --cohort (got {cohort})")
    if len({tuple(m) for m in modality_sets}) != 1:
        raise IPMNError(f"--splits {name}: the official folds differ per input; run one modality set at a time")
    if cv.get("leave_one_center_out") or cv.get("group_by") == "center":
        raise IPMNError(f"--splits {name} replaces the outer folds; drop --leave-one-center-out / --group-by center")
    path = split_file(release, name, next(iter(modality_sets)))
    table = read_split_file(path, tuple(next(iter(modality_sets))))
    if outer_flag is not None and outer_flag != table["n_folds"]:
        raise IPMNError(f"--outer {outer_flag}: {path.name} has {table['n_folds']} official folds")
    kept = [c for c in cases if _fold_of_case(c, table["fold_of"]) is not None]
    warnings = []
    kept_ids = {c.case_id for c in kept}
    missing = [c.case_id for c in cases if c.case_id not in kept_ids]
    if missing:
        warnings.append(f"{len(missing)} cohort case(s) are in no official fold and are left out: {missing[:8]}")
    used = {k for c in kept for k in (c.case_id, c.extra.get("t1_id"), c.extra.get("t2_id")) if k}
    absent = [k for k in table["fold_of"] if k not in used]
    if absent:
        warnings.append(f"{len(absent)} scan(s) of {path.name} are not in this cohort: {absent[:8]}")
    if not kept:
        raise IPMNError(f"--splits {name}: none of the cohort's cases is in {path}")
    source = f"Cyst-X official {SPLITS[name]} folds ({path.relative_to(release.root)}; {table['read']})"
    splits = official_splits(kept, table, source, cv["inner"], cv["seed"], cv.get("stratify_center", True))
    stored = Path(run_dir) / "splits.json"
    if stored.exists() and not overwrite:
        try:
            old = json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("source") != source or [f["test"] for f in old.get("folds", [])] != [f["test"] for f in splits["folds"]]:
            raise IPMNError(f"{stored} holds other splits ({old.get('source') or 'ipmn folds'}); use another --out "
                            "or --overwrite")
    return kept, splits, warnings
