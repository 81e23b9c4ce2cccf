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
SPLITS = {"cystx-3class": "3-class", "cystx-2class": "2-class"}  # read by ipmn.cystx_splits


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

