"""The Cyst-X release (Pan et al. 2025) read as it is published, and its official cross-validation folds.

Layout of the release's ``dataset/`` folder (public Cyst-X repository README)::

    IPMN_images_masks/{t1,t2}/{images,masks}/<scan>.nii.gz   full volumes and pancreas masks
    IPMN_Classification/IPMN_labels_t1_total.xlsx             one row per T1 scan: column 0 file name, 5 risk
    IPMN_Classification/IPMN_labels_t2_total.xlsx             one row per T2 scan: same columns
    IPMN_Classification/IPMN_labels_total.xlsx                one row per patient: 0 T1 file, 1 T2 file, 6 risk
    data splits/classification/3-class/{t1,t2}.csv           5 folds; 2-class/{t1,t2,two_inputs}.csv: 4 folds

Risk 0 = no risk, 1 = low, 2 = high; the 2-class task is high vs no/low (the official ``risk // 2``). A
table may also be given as a CSV export beside the xlsx (same stem). Columns are found by header name
when the header identifies them, else at the official positions. As in the official loaders, rows with
an empty risk are dropped and so are scans whose name matches no centre; the first row is the header
(pandas' default) unless it already holds a scan file name. T1 and T2 are paired by the patient table,
not by equal names. The ROI is the pancreas mask's bounding box plus ``data.roi_margin_mm``: the T1 mask
for T1+T2 cases (the engine crops both scans with one box in scanner space; the official code crops
each scan with its own mask). The release has no patient column: a patient-table row is one patient
(its T1 and T2 scans are grouped), every other scan counts as its own patient.

Pure Python apart from openpyxl for the xlsx tables (no torch), like :mod:`ipmn.cohort`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ipmn.cohort import Case
from ipmn.errors import IPMNError

# Official centre groups and their order (the loaders' ``center_names``); a group's name is its aliases.
CENTRES = (("nyu",), ("CAD", "MCF"), ("northwestern", "NU"), ("AHN", "ahn"), ("mca",), ("IU",), ("EMC",))
CENTRE_NAMES = tuple("+".join(dict.fromkeys(a.upper() if a.lower() == "ahn" else a for a in g)) for g in CENTRES)
_ALIAS = {alias: name for group, name in zip(CENTRES, CENTRE_NAMES, strict=True) for alias in group}
TABLES = {"t1": "IPMN_labels_t1_total", "t2": "IPMN_labels_t2_total", "paired": "IPMN_labels_total"}
# official column positions: (name columns..., risk column)
POSITIONS = {"t1": (0, 5), "t2": (0, 5), "paired": (0, 1, 6)}
TASKS = {"3class": None, "2class": ("no/low risk", "high risk")}
SPLITS = {"cystx-3class": "3-class", "cystx-2class": "2-class"}


def centre_of(name: str) -> str | None:
    """The merged centre of a scan name (``AHN05``, ``EMC_01_002``, ``IU_2`` ...), or None.

    The leading letters decide (``AHN05`` -> AHN); names whose prefix is no alias fall back to the
    official rule (the first group, in the official order, with an alias inside the name).
    """
    m = re.match(r"[A-Za-z]+", name)
    if m and m.group(0) in _ALIAS:
        return _ALIAS[m.group(0)]
    for group, cname in zip(CENTRES, CENTRE_NAMES, strict=True):
        if any(alias in name for alias in group):
            return cname
    return None


def scan_stem(value) -> str:
    """``dir/nyu_0001.nii.gz`` -> ``nyu_0001``."""
    text = str(value).strip().replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if text.lower().endswith(ext):
            return text[: -len(ext)]
    return text


def _looks_like_scan(value) -> bool:
    return bool(re.search(r"\.nii(\.gz)?$", str(value or "").strip(), re.IGNORECASE))


# ------------------------------------------------------------------------------------------------ locating
@dataclass
class Release:
    root: Path  # the dataset/ folder

    @property
    def tables(self) -> Path:
        return self.root / "IPMN_Classification"

    @property
    def images(self) -> Path:
        return self.root / "IPMN_images_masks"

    @property
    def splits(self) -> Path:
        return self.root / "data splits" / "classification"

    def table(self, kind: str) -> Path | None:
        for ext in (".xlsx", ".csv"):
            p = self.tables / (TABLES[kind] + ext)
            if p.is_file():
                return p
        return None


def find_release(path) -> Release | None:
    """The release's dataset/ folder given it, its parent, or its IPMN_Classification folder."""
    p = Path(path)
    for cand in (p, p / "dataset", p.parent):
        if (cand / "IPMN_Classification").is_dir() and any(
            (cand / "IPMN_Classification" / (TABLES[k] + e)).is_file() for k in TABLES for e in (".xlsx", ".csv")
        ):
            return Release(cand)
    return None


# ------------------------------------------------------------------------------------------------ tables
def read_rows(path: Path) -> list[list]:
    """All rows of the first sheet (xlsx) or of a CSV, as lists of cell values (None for empty)."""
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return [[c if c.strip() != "" else None for c in row] for row in csv.reader(fh)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise IPMNError(f"{path} cannot be read as CSV: {exc}") from exc
    try:
        import openpyxl
    except ImportError as exc:
        raise IPMNError(f"reading {path.name} needs openpyxl (pip install openpyxl), or save the table as "
                        f"{path.with_suffix('.csv').name} beside it") from exc
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            rows = [list(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
        finally:
            wb.close()
    except (OSError, ValueError, KeyError) as exc:
        raise IPMNError(f"{path} cannot be read as an xlsx workbook: {exc}") from exc
    return [[None if (isinstance(c, str) and not c.strip()) else c for c in r] for r in rows]


def _norm(h) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(h or "").lower()).strip()


def _by_header(header: list, kind: str) -> tuple | None:
    """Column indices (names..., risk) when the header names them unambiguously, else None."""
    names = [_norm(h) for h in header]
    risk = [i for i, h in enumerate(names) if "risk" in h.split() or h in ("label", "grade", "risk")]
    if len(risk) != 1:
        return None
    ident = re.compile(r"\b(id|name|file|image|scan|patient)\b")
    if kind == "paired":
        t1 = [i for i, h in enumerate(names) if ident.search(h) and re.search(r"\bt1\w*\b", h)]
        t2 = [i for i, h in enumerate(names) if ident.search(h) and re.search(r"\bt2\w*\b", h)]
        return (t1[0], t2[0], risk[0]) if len(t1) == 1 and len(t2) == 1 else None
    idc = [i for i, h in enumerate(names) if ident.search(h)]
    return (idc[0], risk[0]) if len(idc) == 1 else None


def _parse_risk(value) -> int | None | str:
    """0/1/2, None for empty (dropped like the official dropna), or the raw text when invalid."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        if value != value:  # NaN
            return None
        return int(value) if float(value).is_integer() and int(value) in (0, 1, 2) else str(value)
    text = str(value).strip()
    if text.lower() in ("", "nan", "none", "na", "n/a"):
        return None
    from ipmn.cohort import parse_label

    try:
        f = float(text)
        return int(f) if f.is_integer() and int(f) in (0, 1, 2) else text
    except ValueError:
        label = parse_label(text)
        return label if label is not None else text


def read_table(path: Path, kind: str) -> dict:
    """Rows ``{"names": [stem, ...], "risk": 0|1|2|None, "row": n}`` plus how the columns were found."""
    rows = read_rows(path)
    if not rows:
        raise IPMNError(f"{path} is empty")
    header, body, first = rows[0], rows[1:], 2
    headerless = _looks_like_scan(header[0] if header else None)
    if headerless:  # the first row already holds a scan: the table has no header
        header, body, first = [], rows, 1
    cols = _by_header(header, kind) if header else None
    how = "by header"
    if cols is None:
        cols, how = POSITIONS[kind], "at the official positions"
        width = max((len(r) for r in rows), default=0)
        scans = sum(_looks_like_scan(r[cols[0]]) or centre_of(scan_stem(r[cols[0]])) is not None
                    for r in body if len(r) > cols[0] and r[cols[0]] is not None)
        if width <= cols[-1] or scans < max(1, len(body) // 2):
            shown = [str(h) for h in header] if header else [str(c) for c in rows[0]]
            want = ("T1 file name, T2 file name and risk (official columns 0, 1, 6)" if kind == "paired"
                    else "scan file name and risk (official columns 0 and 5)")
            raise IPMNError(f"{path}: cannot find the {want}: no header names them and the official positions do "
                            f"not fit; its columns are {shown}")
    out, problems = [], []
    for n, r in enumerate(body, start=first):
        cells = [r[i] if i < len(r) else None for i in cols]
        if all(c is None for c in r):
            continue
        risk = _parse_risk(cells[-1])
        if isinstance(risk, str):
            problems.append(f"row {n}: risk {risk!r} is not 0, 1 or 2")
            continue
        out.append({"names": [scan_stem(c) if c is not None else "" for c in cells[:-1]], "risk": risk, "row": n,
                    "where": f"{path.name} row {n}"})
    if problems:
        raise IPMNError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:10]))
    described = ", ".join(f"{'risk' if i == len(cols) - 1 else 'name'} = column {c}"
                          + (f" '{header[c]}'" if header and c < len(header) and header[c] is not None else "")
                          for i, c in enumerate(cols))
    note = f"{path.name}: {described} ({how}" + ("; the first row holds data, so no header" if headerless else "") + ")"
    return {"rows": out, "note": note}


# ------------------------------------------------------------------------------------------------ cases
def _file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.nii.gz", f"{stem}.nii", f"{stem}_1.nii.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _scan(release: Release, modality: str, stem: str) -> tuple[Path | None, Path | None]:
    base = release.images / modality
    return _file(base / "images", stem), _file(base / "masks", stem)


def load_release(path, modalities=("t1", "t2")) -> list[Case]:
    """Cases of the release: T1+T2 from the patient table, one modality from its own table, several
    modality sets (``()``) = paired cases plus the scans that are on no paired row."""
    release = find_release(path)
    if release is None:
        raise IPMNError(f"{path}: no Cyst-X release found (expected IPMN_Classification/IPMN_labels_*_total.xlsx)")
    if not release.images.is_dir():
        raise IPMNError(f"Cyst-X release {release.root}: IPMN_images_masks/ (full volumes and pancreas masks) not "
                        "found; ipmn crops the ROI from the full volume around the pancreas mask")
    mods = tuple(modalities)
    want_pairs = mods in (("t1", "t2"), ()) or len(mods) != 1
    notes: list[str] = []
    dropped = {"empty risk": [], "no centre": [], "no image or mask": [], "no name": []}
    paired = _read_kind(release, "paired", required=want_pairs and mods != ())
    singles = {m: _read_kind(release, m, required=mods == (m,)) for m in ("t1", "t2") if mods in ((m,), ())}
    t2_patient = {}
    if paired:
        notes.append(paired["note"] + ("" if want_pairs else "; used to link T2 scans to patients"))
        t2_patient = {r["names"][1]: r["names"][0] for r in paired["rows"] if r["names"][0] and r["names"][1]}
    cases: list[Case] = []
    seen: set[str] = set()
    if paired and want_pairs:
        for r in paired["rows"]:
            t1_id, t2_id = r["names"]
            case = _paired_case(release, t1_id, t2_id, r, dropped)
            if case is not None:
                cases.append(case)
                seen.update({("t1", t1_id), ("t2", t2_id)})
    for m, table in singles.items():
        if table is None:
            continue
        notes.append(table["note"])
        ids = {c.case_id for c in cases}
        for r in table["rows"]:
            stem = r["names"][0]
            if (m, stem) in seen:
                continue
            case = _single_case(release, m, stem, r, t2_patient if m == "t2" else {}, dropped)
            if case is not None:
                if case.case_id in ids:
                    case.case_id = f"{stem}_{m}"
                ids.add(case.case_id)
                cases.append(case)
    for why, items in dropped.items():
        if items:
            official = " (as the official loaders do)" if why in ("empty risk", "no centre") else ""
            notes.append(f"{len(items)} row(s) with {why} left out{official}: {', '.join(items[:8])}"
                         + (" ..." if len(items) > 8 else ""))
    notes.append("patients: the release has no patient column; the T1 and T2 scans on one row of "
                 "IPMN_labels_total are one patient, every other scan counts as its own patient (two scans of "
                 "one patient within one table cannot be recognised)")
    if not cases:
        raise IPMNError(f"Cyst-X release {release.root}: no usable case ({'; '.join(notes[-3:])})")
    shared = tuple(notes)
    for c in cases:
        c.extra["cohort_notes"] = shared
    return cases


def _read_kind(release: Release, kind: str, required: bool) -> dict | None:
    path = release.table(kind)
    if path is None:
        if required:
            raise IPMNError(f"Cyst-X release {release.root}: {TABLES[kind]}.xlsx (or .csv) not found in "
                            f"{release.tables}")
        return None
    return read_table(path, kind)


def _keep(r: dict, label_id: str, dropped: dict) -> str | None:
    """The row's centre, or None after recording why the row is left out."""
    where = f"{r['where']} ({label_id})" if label_id else r["where"]
    if not label_id:
        dropped["no name"].append(where)
        return None
    if r["risk"] is None:
        dropped["empty risk"].append(where)
        return None
    centre = centre_of(label_id)
    if centre is None:
        dropped["no centre"].append(where)
    return centre


def _paired_case(release, t1_id, t2_id, r, dropped) -> Case | None:
    centre = _keep(r, t1_id, dropped)
    if centre is None or not t2_id:
        if centre is not None:
            dropped["no name"].append(f"{r['where']} ({t1_id}: no T2 name)")
        return None
    (t1, m1), (t2, m2) = _scan(release, "t1", t1_id), _scan(release, "t2", t2_id)
    if t1 is None or t2 is None or (m1 or m2) is None:
        dropped["no image or mask"].append(f"{t1_id}/{t2_id}")
        return None
    return Case(t1_id, r["risk"], t1, t2, None, centre, t1_id, m1 or m2,
                {"t1_id": t1_id, "t2_id": t2_id, "source": "IPMN_labels_total"})


def _single_case(release, modality, stem, r, t2_patient, dropped) -> Case | None:
    centre = _keep(r, stem, dropped)
    if centre is None:
        return None
    image, mask = _scan(release, modality, stem)
    if image is None or mask is None:
        dropped["no image or mask"].append(f"{modality}/{stem}")
        return None
    paths = {"t1": image if modality == "t1" else None, "t2": image if modality == "t2" else None}
    return Case(stem, r["risk"], paths["t1"], paths["t2"], None, centre, t2_patient.get(stem, stem), mask,
                {f"{modality}_id": stem, "source": TABLES[modality]})


# ------------------------------------------------------------------------------------------------ 2-class task
def task_for(labels: str | None, splits: str | None) -> str:
    """The label task: explicit ``--labels``, else the one the official split set was made for."""
    if labels:
        if labels not in TASKS:
            raise IPMNError(f"--labels must be one of {list(TASKS)} (got {labels!r})")
        if splits and SPLITS.get(splits, "").startswith("2") != (labels == "2class"):
            raise IPMNError(f"--splits {splits} was made for the {SPLITS[splits]} task; --labels {labels} does not "
                            "match it")
        return labels
    return "2class" if splits == "cystx-2class" else "3class"


def apply_label_task(cases: list[Case], task: str) -> list[Case]:
    """``2class``: high (2) vs no/low risk (0, 1) -> labels 1 / 0, as the official ``risk // 2``."""
    names = TASKS.get(task, "?")
    if names == "?":
        raise IPMNError(f"--labels must be one of {list(TASKS)} (got {task!r})")
    if names is None:
        return list(cases)
    out = []
    for c in cases:
        if c.label not in (0, 1, 2):
            raise IPMNError(f"--labels {task}: case {c.case_id} has label {c.label}, not one of normal/low/high")
        extra = dict(c.extra, class_names=names, label_3class=c.label)
        out.append(Case(c.case_id, c.label // 2, c.t1, c.t2, c.roi, c.center, c.patient_id, c.mask, extra))
    return out


def config_for_task(raw: dict, task: str) -> dict:
    """The raw config with a 2-class head for ``2class``; 3-class configs are returned unchanged."""
    names = TASKS.get(task)
    if names is None:
        return raw
    raw = dict(raw or {})
    model = dict(raw.get("model") or {})
    if model.get("num_classes") not in (None, 2) or (model.get("class_names") not in (None, list(names))):
        raise IPMNError(f"--labels {task}: the config sets model.num_classes/class_names for another task")
    weights = (raw.get("train") or {}).get("class_weights")
    if isinstance(weights, list) and len(weights) != 2:
        raise IPMNError(f"--labels {task}: train.class_weights lists {len(weights)} weights; give 2, or balanced")
    raw["model"] = dict(model, num_classes=2, class_names=list(names))
    return raw


# ------------------------------------------------------------------------------------------------ official folds
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
    from ipmn.cv import SPLITS_VERSION, _check_class_groups, _kfold, verify_splits

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
        _check_class_groups(train_cases, [c.patient_id or c.case_id for c in train_cases], inner, "--inner",
                            f"the training set of official fold {k} (inner folds)")
        inner_folds, inner_how, _ = _kfold(train_cases, inner, seed * 7919 + k + 1, "patient", stratify_center, True)
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
    missing = [c.case_id for c in cases if c not in kept]
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
