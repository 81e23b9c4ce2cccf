"""Model vs readers (radiologists) on the same patients: ``ipmn cv-report RUN --readers CSV``.

The readers' table has a patient id column, a truth column and one column per reader, grades 0/1/2
(no/low/high risk), e.g. Cyst-X's ``Cyst-X_bigdata_risk_assessment.csv`` (``Patient ID``,
``Ground_truth_Risk_Assessment``, ``reader1..3``). It is copied into the run folder (``readers.csv``) so
that every later report carries the comparison. Patients are matched by id to the cases the model was
tested on (outer test folds; the case id or the patient id of splits.json, ``.nii.gz`` and case ignored);
only matched patients count, for the model and for every reader, and the truth is the cohort's label
(ids whose reader-table truth differs are listed). For a 2-class model the grades are mapped as the
labels (``grade // 2``). High risk is the positive class: sensitivity = recall of high, specificity =
share of the others not called high; the model's curve is its pooled high-vs-rest ROC and each reader
is one point on it, beside the model's sensitivity at that reader's specificity.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError

READERS_FILE = "readers.csv"


def _norm(h) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(h or "").lower()).strip()


def _key(value) -> str:
    from ipmn.cystx import scan_stem

    return scan_stem(value).lower()


def load_readers(path) -> dict:
    """``{"id_column", "truth_column", "readers": [...], "rows": [{"id", "truth", "reads": {name: grade}}]}``."""
    from ipmn.cystx import _parse_risk, read_rows

    path = Path(path)
    if not path.is_file():
        raise IPMNError(f"readers table not found: {path}")
    rows = read_rows(path)
    header = [str(h or "") for h in (rows[0] if rows else [])]
    names = [_norm(h) for h in header]
    ids = [i for i, h in enumerate(names) if re.search(r"\b(id|patient|case|name|scan)\b", h)]
    truth = [i for i, h in enumerate(names) if re.search(r"truth|ground|\bgt\b|reference", h) or h in ("label", "risk")]
    body = [r for r in rows[1:] if any(c is not None for c in r)]
    if len(ids) < 1 or len(truth) != 1 or truth[0] == ids[0]:
        raise IPMNError(f"{path}: cannot recognise a patient id column and one truth column in its header {header}; "
                        "expected e.g. 'Patient ID,Ground_truth_Risk_Assessment,reader1,reader2'")
    id_col, truth_col = ids[0], truth[0]

    def grades(i):
        return [_parse_risk(r[i] if i < len(r) else None) for r in body]

    readers = [i for i in range(len(header)) if i not in (id_col, truth_col)
               and body and not any(isinstance(g, str) for g in grades(i)) and any(g is not None for g in grades(i))]
    if not readers:
        raise IPMNError(f"{path}: no reader column with grades 0/1/2 besides '{header[id_col]}' and "
                        f"'{header[truth_col]}' (header {header})")
    bad = [f"row {n}: truth {r[truth_col]!r}" for n, r in enumerate(body, start=2)
           if isinstance(_parse_risk(r[truth_col] if truth_col < len(r) else None), str)]
    if bad:
        raise IPMNError(f"{path}: truth values that are not 0, 1 or 2: {'; '.join(bad[:10])}")
    out = []
    for r in body:
        t = _parse_risk(r[truth_col] if truth_col < len(r) else None)
        if r[id_col] is None or t is None:
            continue
        out.append({"id": str(r[id_col]).strip(), "truth": t,
                    "reads": {header[i]: _parse_risk(r[i] if i < len(r) else None) for i in readers}})
    if not out:
        raise IPMNError(f"{path}: no row with a patient id and a truth value")
    return {"path": str(path), "id_column": header[id_col], "truth_column": header[truth_col],
            "readers": [header[i] for i in readers], "rows": out}


def keep_readers(src, run_dir) -> Path:
    """Check the table, then copy it into the run folder, where every later report finds it."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise IPMNError(f"{run_dir} is not an ipmn cv run folder (no run.json)")
    load_readers(src)
    dest = run_dir / READERS_FILE
    if Path(src).resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    return dest


# ------------------------------------------------------------------------------------------------ scores
def scores(y: np.ndarray, pred: np.ndarray, names) -> dict:
    """Accuracy, recall per class, and high-risk (last class) sensitivity / specificity."""
    high = len(names) - 1
    pos, called = y == high, pred == high
    recall = {n: (float((pred[y == k] == k).mean()) if (y == k).any() else None) for k, n in enumerate(names)}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else None, "recall": recall,
            "sensitivity_high": float(called[pos].mean()) if pos.any() else None,
            "specificity_high": float((~called[~pos]).mean()) if (~pos).any() else None}


def _operating(fpr, tpr, reader: dict) -> dict:
    out = {}
    if reader["specificity_high"] is not None:
        ok = fpr <= 1.0 - reader["specificity_high"] + 1e-12
        out["model_sensitivity_at_reader_specificity"] = float(tpr[ok].max()) if ok.any() else 0.0
    if reader["sensitivity_high"] is not None:
        ok = tpr >= reader["sensitivity_high"] - 1e-12
        out["model_specificity_at_reader_sensitivity"] = float(1.0 - fpr[ok].min()) if ok.any() else 0.0
    return out


def compare_model(predictions: list[dict], patient_of: dict, table: dict, names) -> dict:
    """One model's pooled test predictions (``case_id, true, probs``) against the readers."""
    from sklearn.metrics import roc_auc_score, roc_curve

    nc = len(names)
    if nc not in (2, 3):
        return {"skipped": f"readers grade 3 risk levels; a {nc}-class model cannot be compared"}
    grade = (lambda g: None if g is None else g // 2) if nc == 2 else (lambda g: g)
    by_id = {}
    for row in table["rows"]:
        by_id.setdefault(_key(row["id"]), row)
    matched, used = [], set()
    for p in predictions:
        for k in (_key(p["case_id"]), _key(patient_of.get(p["case_id"]) or "")):
            if k in by_id and k not in used:
                matched.append((p, by_id[k]))
                used.add(k)
                break
    tested = {p["case_id"] for p in predictions}
    out = {"n_tested": len(tested), "n_matched": len(matched), "matched": [p["case_id"] for p, _ in matched],
           "unmatched_reader_ids": [r["id"] for k, r in by_id.items() if k not in used],
           "tested_without_reads": sorted(tested - {p["case_id"] for p, _ in matched})}
    if not matched:
        return out
    y = np.array([p["true"] for p, _ in matched], dtype=int)
    probs = np.array([p["probs"] for p, _ in matched], dtype=float)
    out["truth_mismatch"] = [r["id"] for (p, r) in matched if grade(r["truth"]) != p["true"]]
    out["model"] = scores(y, probs.argmax(axis=1), names)
    pos = y == nc - 1
    if pos.any() and (~pos).any():
        fpr, tpr, _ = roc_curve(pos.astype(int), probs[:, nc - 1])
        out["model"]["auc_high"] = float(roc_auc_score(pos.astype(int), probs[:, nc - 1]))
        out["roc_high"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["readers"] = {}
    for name in table["readers"]:
        keep = [i for i, (_, r) in enumerate(matched) if r["reads"].get(name) is not None]
        read = np.array([grade(matched[i][1]["reads"][name]) for i in keep], dtype=int)
        entry = scores(y[keep], read, names)
        if "roc_high" in out:
            entry |= _operating(np.array(out["roc_high"]["fpr"]), np.array(out["roc_high"]["tpr"]), entry)
        out["readers"][name] = entry
    return out


def as_published(table: dict) -> dict:
    """Each reader against the table's own truth on all its rows (3 classes), e.g. to check the file."""
    names = ("none", "low", "high")
    out = {}
    for name in table["readers"]:
        rows = [r for r in table["rows"] if r["reads"].get(name) is not None]
        out[name] = scores(np.array([r["truth"] for r in rows], dtype=int),
                           np.array([r["reads"][name] for r in rows], dtype=int), names)
    return out


def compare_run(run_dir, data: dict, models: list[dict]) -> dict | None:
    """The comparison for every model of a run (None when the run has no readers table)."""
    path = Path(run_dir) / READERS_FILE
    if not path.is_file():
        return None
    table = load_readers(path)
    patient_of = {c["case_id"]: c.get("patient_id") for c in data["splits"]["cases"]}
    out = {"table": table["path"], "id_column": table["id_column"], "truth_column": table["truth_column"],
           "readers": table["readers"], "n_rows": len(table["rows"]), "as_published": as_published(table),
           "models": []}
    for v, m in zip(data["variants"], models, strict=True):
        preds = [p for r in v["results"] for p in r["predictions"]]
        out["models"].append({"name": m["name"], "label": m["label"], "class_names": m["class_names"],
                              **compare_model(preds, patient_of, table, m["class_names"])})
    return out


# ------------------------------------------------------------------------------------------------ report
def fig_readers_roc(entry: dict) -> str | None:
    """The model's high-vs-rest ROC on the matched patients with each reader as a point."""
    if "roc_high" not in entry:
        return None
    from ipmn.report import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.plot(entry["roc_high"]["fpr"], entry["roc_high"]["tpr"], color="black",
            label=f"model (AUC {entry['model']['auc_high']:.2f})")
    m = entry["model"]
    ax.scatter([1 - m["specificity_high"]], [m["sensitivity_high"]], marker="o", color="black", zorder=3,
               label="model (argmax)")
    for name, r in entry["readers"].items():
        if r["sensitivity_high"] is not None and r["specificity_high"] is not None:
            ax.scatter([1 - r["specificity_high"]], [r["sensitivity_high"]], marker="^", s=50, zorder=3, label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("1 - specificity (high risk)")
    ax.set_ylabel("sensitivity (high risk)")
    ax.set_title(f"high risk vs rest, the {entry['n_matched']} matched patients", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def html_section(cmp: dict) -> str:
    """The model-vs-readers part of report.html (inserted as is by the report template)."""
    from ipmn.report import _fmt

    esc = html.escape
    parts = [f"<h2>Model vs readers</h2><p class='note'>Readers' table {esc(cmp['table'])} ({cmp['n_rows']} rows; "
             f"id '{esc(cmp['id_column'])}', truth '{esc(cmp['truth_column'])}', readers "
             f"{esc(', '.join(cmp['readers']))}). Every number below is on the patients that are both in the table "
             "and in an outer test fold; truth = the cohort's labels; high risk is the positive class.</p>"]
    for e in cmp["models"]:
        parts.append(f"<h3>{esc(e['label'] or e['name'])}</h3>")
        if e.get("skipped"):
            parts.append(f"<p>{esc(e['skipped'])}</p>")
            continue
        parts.append(f"<p>{e['n_matched']} of {e['n_tested']} tested patients matched; "
                     f"{len(e['unmatched_reader_ids'])} reader-table ids unmatched"
                     + (f": {esc(', '.join(e['unmatched_reader_ids'][:40]))}"
                        + (" ..." if len(e["unmatched_reader_ids"]) > 40 else "") if e["unmatched_reader_ids"] else "")
                     + ".</p>")
        if not e["n_matched"]:
            continue
        if e.get("truth_mismatch"):
            parts.append(f"<div class='warn'>{len(e['truth_mismatch'])} matched patient(s) have another truth in the "
                         f"readers' table: {esc(', '.join(e['truth_mismatch'][:40]))}</div>")
        names = e["class_names"]
        rows = []
        for who, s in [("model (argmax)", e["model"])] + list(e["readers"].items()):
            rows.append([esc(who), s["n"], _fmt(s["accuracy"]), *[_fmt(s["recall"][n]) for n in names],
                         _fmt(s["sensitivity_high"]), _fmt(s["specificity_high"]),
                         _fmt(s.get("model_sensitivity_at_reader_specificity")),
                         _fmt(s.get("model_specificity_at_reader_sensitivity"))])
        parts.append(_table(["", "n", "accuracy", *[f"recall {n}" for n in names], "sensitivity (high)",
                             "specificity (high)", "model sens. at this spec.", "model spec. at this sens."], rows))
        try:
            b64 = fig_readers_roc(e)
        except (ValueError, RuntimeError) as exc:
            parts.append(f"<p class='note'>(readers' ROC not drawn: {esc(str(exc))})</p>")
            b64 = None
        if b64:
            parts.append("<div class='figs'>" + _img(b64, "model ROC with readers") + "</div>")
    pub = cmp["as_published"]
    parts.append("<p class='note'>Readers on the whole table against its own truth (3 classes): "
                 + "; ".join(f"{esc(k)} accuracy {_fmt(v['accuracy'])}, high-risk sensitivity "
                             f"{_fmt(v['sensitivity_high'])}, specificity {_fmt(v['specificity_high'])} (n {v['n']})"
                             for k, v in pub.items()) + ".</p>")
    return "\n".join(parts)
