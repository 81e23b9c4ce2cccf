"""Cohorts: the CSV manifest and the Cyst-X-style folder layout, validated completely before any work.

Manifest columns: ``case_id, t1, t2, roi, label`` and optionally ``center``, ``patient_id`` (defaults to
``case_id``; cases of one patient never go to different folds), ``mask``. Paths are relative to the
manifest. Labels are ``normal|low|high`` or ``0|1|2``. ``t1``/``t2`` may be empty for single-modality
cohorts; ``roi`` may be a ``.mrk.json``, a mask volume, or empty when ``mask`` is given. An optional
``mask_segment`` column names the segment (or ROI) to use from a file that holds several, and
``t1_series``/``t2_series`` the SeriesInstanceUID to read from a DICOM folder that holds several.

This module is pure Python (no torch) so the Slicer trainer can import it in the GUI process.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ipmn.errors import IPMNError
from ipmn.vocab import CLASS_NAMES, case_id_problem, looks_like_box

REQUIRED = ("case_id", "t1", "t2", "roi", "label")
OPTIONAL = ("center", "patient_id", "mask", "lesion")
LABEL_ALIASES = {
    "normal": 0, "0": 0, "none": 0, "no risk": 0,
    "low": 1, "1": 1, "low risk": 1, "low-risk": 1, "lgd": 1,
    "high": 2, "2": 2, "high risk": 2, "high-risk": 2, "hgd": 2,
}  # fmt: skip


@dataclass
class Case:
    case_id: str
    label: int
    t1: Path | None
    t2: Path | None
    roi: str | None  # a path, or None when the ROI comes from ``mask``
    center: str = ""
    patient_id: str = ""
    mask: Path | None = None
    extra: dict = field(default_factory=dict)
    lesion: Path | None = None  # label volume, nonzero = lesion, any geometry (``ipmn evaluate``)

    @property
    def label_name(self) -> str:
        return (self.extra.get("class_names") or CLASS_NAMES)[self.label] if self.label >= 0 else ""

    def has(self, modality: str) -> bool:
        return getattr(self, modality) is not None

    @property
    def roi_spec(self) -> dict:
        """The ROI as ``ipmn predict`` takes it: the ``roi`` column when given, else the ``mask`` (+ margin)."""
        return {"roi": self.roi, "mask": None} if self.roi else {"roi": None, "mask": self.mask}

    @property
    def choices(self) -> dict:
        """Which DICOM series (``t1_series``/``t2_series``) and which segment (``mask_segment``) to read."""
        extra = self.extra or {}
        return {"series": {m: extra[f"{m}_series"] for m in ("t1", "t2") if extra.get(f"{m}_series")},
                "segment": extra.get("mask_segment") or None}


def parse_label(value: str) -> int | None:
    return LABEL_ALIASES.get(str(value).strip().lower())


def load_manifest(path: str | os.PathLike, modalities=("t1", "t2"), require_labels: bool = True) -> list[Case]:
    """Read and validate a manifest; every problem is listed in one IPMNError.

    ``require_labels=False``: a manifest without a ``label`` column, or with every label empty, gives
    cases with ``label = -1`` (unlabelled); a partly labelled manifest is still an error. Just over 80
    lines: every row's checks sit in one loop so that all problems are collected into one message.
    """
    path = Path(path)
    if not path.is_file():
        raise IPMNError(f"cohort manifest not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IPMNError(f"cohort manifest {path} cannot be read as CSV: {exc}") from exc
    labelled = require_labels or any(row.get("label") for row in rows)
    missing_cols = [c for c in REQUIRED if c not in header and not (c == "roi" and "mask" in header)
                    and not (c == "label" and not labelled)]
    if missing_cols:
        raise IPMNError(f"cohort manifest {path}: missing column(s) {missing_cols}; required: {list(REQUIRED)}")
    root = path.parent
    problems: list[str] = []
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        cid = row.get("case_id", "")
        where = f"line {line}" + (f" ({cid})" if cid else "")
        if not cid:
            problems.append(f"{where}: empty case_id")
        elif case_id_problem(cid):
            problems.append(f"line {line} ({cid!r}): case_id {case_id_problem(cid)}")
            cid = ""
        elif cid in seen:
            problems.append(f"{where}: duplicate case_id (first on line {seen[cid]})")
        else:
            seen[cid] = line
        label = parse_label(row.get("label", "")) if labelled else -1
        if label is None:
            problems.append(f"{where}: unknown label {row.get('label', '')!r} (use normal|low|high or 0|1|2)")

        def file_of(col, required, row=row, where=where):
            value = row.get(col, "")
            if not value:
                if required:
                    problems.append(f"{where}: no {col} given")
                return None
            p = (root / value) if not Path(value).is_absolute() else Path(value)
            if not p.exists():
                problems.append(f"{where}: {col} file not found: {value}")
            return p

        t1 = file_of("t1", "t1" in modalities and len(modalities) > 1)
        t2 = file_of("t2", "t2" in modalities and len(modalities) > 1)
        if len(modalities) == 1 and file_of(modalities[0], False) is None:
            problems.append(f"{where}: no {modalities[0]} given")
        mask = file_of("mask", False) if row.get("mask") else None
        roi_value = row.get("roi", "")
        roi = None
        if roi_value:
            if looks_like_box(roi_value, root):
                roi = roi_value
            else:
                rp = file_of("roi", True)
                roi = str(rp) if rp else None
        elif mask is None:
            problems.append(f"{where}: no roi and no mask given")
        lesion = file_of("lesion", False) if row.get("lesion") else None
        extra = {k: v for k, v in row.items() if k not in REQUIRED + OPTIONAL}
        if label is not None and cid:
            cases.append(
                Case(cid, label, t1, t2, roi, row.get("center", ""), row.get("patient_id", "") or cid, mask, extra,
                     lesion)
            )
    if not rows:
        problems.append("the manifest has no cases")
    problems += patient_label_conflicts(cases)
    if problems:
        shown = problems[:25]
        more = f"; ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise IPMNError(f"cohort manifest {path} has {len(problems)} problem(s): " + "; ".join(shown) + more)
    return cases


def patient_label_conflicts(cases: list[Case]) -> list[str]:
    """One problem per patient whose cases carry different labels (one patient has one grade)."""
    by_patient: dict[str, list[Case]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id, []).append(c)
    return [f"patient {pid!r} has cases with different labels ("
            + ", ".join(f"{c.case_id}: {c.label_name}" for c in group) + ")"
            for pid, group in by_patient.items() if len({c.label for c in group}) > 1]


def load_cystx(folder: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> list[Case]:
    """The Cyst-X public layout: ``{t1,t2}/{images,masks}/<center>_<id>.nii.gz`` plus a labels table.

    The labels table has columns ``case_id`` (``<center>_<id>``) and ``label``. ROI = mask bounding box
    (+ margin at load time). Cases with one modality are kept (single-modality runs use them).
    """
    folder = Path(folder)
    labels_csv = Path(labels_csv) if labels_csv else folder / "labels.csv"
    if not labels_csv.is_file():
        raise IPMNError(f"Cyst-X cohort: labels table not found: {labels_csv} (nor the release's "
                        "IPMN_Classification/IPMN_labels_*_total.xlsx in the folder or its dataset/ subfolder)")
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        labels = {r["case_id"].strip(): r["label"].strip() for r in csv.DictReader(fh)}
    problems = []
    cases = []
    for cid, raw in sorted(labels.items()):
        if case_id_problem(cid):
            problems.append(f"{cid!r}: case_id {case_id_problem(cid)}")
            continue
        label = parse_label(raw)
        if label is None:
            problems.append(f"{cid}: unknown label {raw!r}")
            continue
        paths = {}
        for mod in ("t1", "t2"):
            img = folder / mod / "images" / f"{cid}.nii.gz"
            msk = folder / mod / "masks" / f"{cid}.nii.gz"
            paths[mod] = (img if img.exists() else None, msk if msk.exists() else None)
        if paths["t1"][0] is None and paths["t2"][0] is None:
            problems.append(f"{cid}: no T1 or T2 image")
            continue
        mask = paths["t1"][1] or paths["t2"][1]
        if mask is None:
            problems.append(f"{cid}: no pancreas mask")
            continue
        center = cid.split("_")[0] if "_" in cid else ""
        cases.append(Case(cid, label, paths["t1"][0], paths["t2"][0], None, center, cid, mask))
    if problems:
        raise IPMNError(f"Cyst-X cohort {folder} has {len(problems)} problem(s): " + "; ".join(problems[:25]))
    return cases


def load_cohort(spec: str | os.PathLike, modalities=("t1", "t2")) -> list[Case]:
    """A manifest CSV, the Cyst-X release's dataset/ folder (:mod:`ipmn.cystx`), or a Cyst-X-style folder."""
    p = Path(spec)
    if p.is_dir():
        from ipmn.cystx import find_release, load_release

        if find_release(p) is not None:
            cases = load_release(p, modalities)
            bad = [f"{c.case_id!r}: case_id {case_id_problem(c.case_id)}" for c in cases if case_id_problem(c.case_id)]
            if bad:
                raise IPMNError(f"Cyst-X release {p}: {len(bad)} scan name(s) cannot name a case: " + "; ".join(bad[:10]))
            return cases
        return load_cystx(p)
    return load_manifest(p, modalities)


def usable(cases: list[Case], modalities) -> tuple[list[Case], list[Case]]:
    """Split into cases that have every modality needed and those that do not."""
    ok = [c for c in cases if all(c.has(m) for m in modalities)]
    return ok, [c for c in cases if c not in ok]


def summarize(cases: list[Case]) -> dict:
    per_class = Counter(c.label_name for c in cases)
    per_center = Counter(c.center or "-" for c in cases)
    names = next((c.extra["class_names"] for c in cases if c.extra.get("class_names")), CLASS_NAMES)
    notes = list(dict.fromkeys(n for c in cases for n in c.extra.get("cohort_notes", ())))
    return {
        "n_cases": len(cases),
        "n_patients": len({c.patient_id for c in cases}),
        "per_class": {name: per_class.get(name, 0) for name in names},
        "per_center": dict(sorted(per_center.items())),
        "with_t1": sum(c.t1 is not None for c in cases),
        "with_t2": sum(c.t2 is not None for c in cases),
    } | ({"notes": notes} if notes else {})
