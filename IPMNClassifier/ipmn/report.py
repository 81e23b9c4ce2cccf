"""The cross-validation report: ``metrics.json``, ``predictions.csv`` and a self-contained ``report.html``.

``write_report(RUN_DIR)`` (also ``ipmn cv-report RUN_DIR``) merges every finished fold of every variant
(``<variant>/fold_<k>/result.json``); unfinished folds are listed as missing, never guessed.

* ``metrics.json``: ``{"summary": {metric: {"mean", "std", "ddof": 1, "n"}}, "folds": [{"fold", "metrics"}],
  "models": [{"name", ..., "summary", "summary_calibrated", "folds", "pooled", ...}], ...}`` — ``summary``
  and ``folds`` at the top level are the first variant's (the only one unless ``--models``/``--modalities``/
  ``--fusion`` gave several). Summaries are mean ± sample standard deviation over outer folds (ddof = 1).
* ``predictions.csv``: one row per outer-test prediction: ``case_id, fold, true, prob_<class>..., model,
  pred, prob_<class>_calibrated...`` (``true``/``pred`` are class indices, probabilities before and after
  temperature scaling).
* ``report.html`` (Jinja2 template ``templates/report.html.j2``): the paper's Table I (architectures) /
  Table II (inputs and fusion) layout, per-fold tables, learning curves, the pooled confusion matrix, ROC
  curves, calibration plots (before/after temperature scaling) and a few test grids with their rollout
  maps — PNGs embedded as base64.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from ipmn.errors import IPMNError
from ipmn.io import atomic_path, write_json, write_text
from ipmn.metrics import (
    DDOF,
    LABELS,
    METRICS,
    classification_metrics,
    format_mean_std,
    pooled_confusion,
    summarize,
)
from ipmn.vocab import CLASS_NAMES

TABLE_METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc", "ece")


def collect(run_dir) -> dict:
    """Everything finished in a run folder."""
    run_dir = Path(run_dir)
    from ipmn.runs import read_run_json

    try:
        run = read_run_json(run_dir / "run.json")
    except FileNotFoundError as exc:
        raise IPMNError(f"{run_dir} is not an ipmn cv run folder (no run.json)") from exc
    try:
        splits = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IPMNError(f"{run_dir} has no readable splits.json yet: no fold has started") from exc
    n_folds = len(splits["folds"])
    variants = []
    for v in run.get("variants_full") or run.get("variants", []):
        results, missing = [], []
        for k in range(n_folds):
            path = run_dir / v["name"] / f"fold_{k}" / "result.json"
            try:
                results.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                missing.append(k)
        variants.append({**v, "results": results, "missing": missing})
    return {"run": run, "splits": splits, "variants": variants, "n_folds": n_folds}


def _model_entry(v: dict) -> dict:
    res = v["results"]
    fold_metrics = [r["metrics"] for r in res]
    calibrated = [r["metrics_calibrated"] for r in res]
    names = (v.get("model") or {}).get("class_names") or list(CLASS_NAMES)
    y = np.array([p["true"] for r in res for p in r["predictions"]], dtype=int)
    probs = np.array([p["probs"] for r in res for p in r["predictions"]], dtype=float).reshape(len(y), len(names))
    probs_t = np.array([p["probs_calibrated"] for r in res for p in r["predictions"]], dtype=float).reshape(len(y), len(names))
    return {
        "name": v["name"],
        "label": v.get("label", v["name"]),
        "arch": v.get("arch"),
        "modalities": v.get("modalities"),
        "fusion": v.get("fusion"),
        "class_names": names,
        "summary": summarize(fold_metrics),
        "summary_calibrated": summarize(calibrated),
        "folds": [{"fold": r["fold"], "metrics": r["metrics"], "metrics_calibrated": r["metrics_calibrated"],
                   "selected": r["selected"], "temperature": r["temperature"], "n_train": r["n_train"],
                   "n_test": r["n_test"], "test_center": r.get("test_center")} for r in res],
        "pooled": classification_metrics(y, probs, len(names)) if len(y) else None,
        "pooled_calibrated": classification_metrics(y, probs_t, len(names)) if len(y) else None,
        "pooled_confusion": pooled_confusion(fold_metrics),
        "localisation": _pooled_localisation(res),
        "folds_done": [r["fold"] for r in res],
        "folds_missing": v["missing"],
    }


def _pooled_localisation(results: list) -> dict | None:
    """Pointing game and lift over every outer test case with a lesion mask (all folds pooled)."""
    rows = [row for r in results for row in ((r.get("localisation") or {}).get("cases") or [])]
    if not rows:
        return None
    from ipmn.evaluate import localisation_summary

    return localisation_summary(rows, "label")


def write_predictions(dest: Path, data: dict) -> Path:
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = None
        for v in data["variants"]:
            names = (v.get("model") or {}).get("class_names") or list(CLASS_NAMES)
            if writer is None:
                writer = csv.writer(fh)
                writer.writerow(["case_id", "fold", "true", *[f"prob_{n}" for n in names], "model", "pred",
                                 *[f"prob_{n}_calibrated" for n in names]])
            for r in v["results"]:
                for p in r["predictions"]:
                    writer.writerow([p["case_id"], r["fold"], p["true"], *[f"{x:.6f}" for x in p["probs"]], v["name"],
                                     int(np.argmax(p["probs"])), *[f"{x:.6f}" for x in p["probs_calibrated"]]])
        if writer is None:
            csv.writer(fh).writerow(["case_id", "fold", "true", *[f"prob_{n}" for n in CLASS_NAMES], "model"])
    return dest


def write_report(run_dir, progress=None) -> dict:
    """Write metrics.json, predictions.csv and report.html for whatever folds are finished."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    models = [_model_entry(v) for v in data["variants"]]
    complete = all(not m["folds_missing"] for m in models)
    first = models[0] if models else {"summary": {}, "folds": []}
    metrics = {
        "ddof": DDOF,
        "std": "sample standard deviation over outer folds (ddof=1)",
        "n_folds": data["n_folds"],
        "complete": complete,
        "summary": first["summary"],
        "summary_calibrated": first.get("summary_calibrated", {}),
        "folds": [{"fold": f["fold"], "metrics": f["metrics"]} for f in first["folds"]],
        "models": models,
        "synthetic": bool((data["run"].get("cohort_info") or {}).get("synthetic")),
        "split_source": data["splits"].get("source") or "ipmn (nested, patient-grouped, stratified)",
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    from ipmn.readers import compare_run

    readers = compare_run(run_dir, data, models)
    if readers is not None:
        metrics["readers"] = readers
    write_json(metrics, run_dir / "metrics.json")
    write_predictions(run_dir / "predictions.csv", data)
    write_text(_html(data, models, metrics, run_dir), run_dir / "report.html")
    if progress is not None:
        progress.stage("report", f"{'complete' if complete else 'partial'} report: {run_dir / 'report.html'}")
    return {"metrics": str(run_dir / "metrics.json"), "predictions": str(run_dir / "predictions.csv"),
            "html": str(run_dir / "report.html"), "complete": complete}


# ------------------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def fig_learning_curves(v: dict, metric: str) -> str | None:
    res = v["results"]
    if not res:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    key = {"balanced_accuracy": "val_balanced_accuracy", "accuracy": "val_acc", "macro_auc": "val_macro_auc",
           "loss": "val_loss"}[metric]
    for r in res:
        sel = r["selected"]
        for cand in r["inner_curves"]:
            if cand["lr"] != sel["lr"]:
                continue
            n = min(len(h) for h in cand["runs"])
            ep = np.arange(1, n + 1)
            score = np.mean([[h[e].get(key) or 0.0 for e in range(n)] for h in cand["runs"]], axis=0)
            vloss = np.mean([[h[e]["val_loss"] for e in range(n)] for h in cand["runs"]], axis=0)
            tloss = np.mean([[h[e]["train_loss"] for e in range(n)] for h in cand["runs"]], axis=0)
            line = axes[0].plot(ep, score, label=f"fold {r['fold']}")[0]
            axes[0].axvline(sel["epoch"], color=line.get_color(), ls=":", lw=0.8)
            axes[1].plot(ep, vloss, color=line.get_color(), label=f"fold {r['fold']} inner val")
            axes[1].plot(ep, tloss, color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_title(f"inner validation {metric} (mean of inner folds); dotted: selected epoch", fontsize=9)
    axes[0].set_xlabel("epoch")
    axes[1].set_title("loss: inner validation (solid), inner training (dashed)", fontsize=9)
    axes[1].set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_confusion(m: dict) -> str | None:
    cm = np.asarray(m["pooled_confusion"])
    if cm.size == 0:
        return None
    plt = _plt()
    names = m["class_names"]
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("pooled over outer test folds", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _pooled(v: dict, calibrated: bool = False):
    key = "probs_calibrated" if calibrated else "probs"
    y = np.array([p["true"] for r in v["results"] for p in r["predictions"]], dtype=int)
    probs = np.array([p[key] for r in v["results"] for p in r["predictions"]], dtype=float)
    return y, probs


def fig_roc(v: dict, names) -> str | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    y, probs = _pooled(v)
    if len(y) == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for c, name in enumerate(names):
        pos = y == c
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos.astype(int), probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} vs rest (AUC {roc_auc_score(pos.astype(int), probs[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC, pooled test predictions", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def fig_calibration(v: dict) -> str | None:
    from ipmn.metrics import ece_score, reliability

    y, probs = _pooled(v)
    if len(y) == 0:
        return None
    _, probs_t = _pooled(v, calibrated=True)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for p, name in ((probs, "before"), (probs_t, "after temperature")):
        rel = reliability(y, p)
        xs = [c for c, n in zip(rel["confidence"], rel["count"], strict=True) if n]
        ys = [a for a, n in zip(rel["accuracy"], rel["count"], strict=True) if n]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability, pooled test predictions (10 bins)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;max-width:1150px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.warn{background:#fff4e5;border:1px solid #f0a030;padding:8px 12px;margin:10px 0}
.note{color:#555;font-size:12px} .figs img{margin:4px;vertical-align:top;border:1px solid #eee}
"""


def _fmt(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, keep_trailing_newline=False)
    return env.get_template("report.html.j2")


def _figures(v: dict, m: dict, select_metric: str) -> tuple[list, list]:
    """The variant's embedded figures and, for any that failed, a note (a figure never breaks the report)."""
    figures, notes = [], []
    for fn, args, alt in ((fig_learning_curves, (v, select_metric), "learning curves"),
                          (fig_confusion, (m,), "confusion matrix"),
                          (fig_roc, (v, m["class_names"]), "ROC curves"),
                          (fig_calibration, (v,), "calibration")):
        try:
            b64 = fn(*args)
        except Exception as exc:  # noqa: BLE001 - a figure never breaks the report
            notes.append(f"{alt} not drawn: {type(exc).__name__}: {exc}")
            continue
        if b64:
            figures.append({"b64": b64, "alt": alt})
    return figures, notes


def _variant(v: dict, m: dict, run_dir: Path, select_metric: str) -> dict:
    rows = []
    for f in m["folds"]:
        mm, mc = f["metrics"], f["metrics_calibrated"]
        rows.append([f["fold"] if not f.get("test_center") else f"{f['fold']} ({f['test_center']})",
                     f["n_train"], f["n_test"], f["selected"]["epoch"], _fmt(f["selected"]["lr"], 6),
                     _fmt(f["temperature"], 2), *[_fmt(mm[k]) for k in TABLE_METRICS], _fmt(mc["ece"]),
                     _fmt(mm["nll"]), _fmt(mc["nll"])])
    p = m["pooled"]
    pooled = {"n": p["n"], **{k: _fmt(p[k]) for k in ("accuracy", "balanced_accuracy", "macro_auc")}} if p else None
    loc = (m.get("localisation") or {}).get("overall")
    localisation = ({"n": loc["n"], "pointing_game": _fmt(loc["pointing_game"]), "hits": loc["pointing_hits"],
                     "lift_median": _fmt(loc["lift_median"]), "lift_mean": _fmt(loc["lift_mean"])}
                    if loc and loc["n"] else None)
    figures, notes = _figures(v, m, select_metric)
    examples = []
    for e in (e | {"fold": r["fold"]} for r in v["results"] for e in r.get("examples", [])):
        path = run_dir / e["png"]
        if path.is_file():
            examples.append({"b64": base64.b64encode(path.read_bytes()).decode("ascii"),
                             "alt": f"fold {e['fold']} {e['case_id']}", "width": 540})
    return {"label": m["label"] or m["name"], "fold_rows": rows, "pooled": pooled, "localisation": localisation,
            "figures": figures,
            "figure_notes": notes, "examples": examples}


def _readers_html(metrics: dict) -> str:
    """The model-vs-readers section (ipmn.readers builds it with its own escaping), or nothing."""
    if not metrics.get("readers"):
        return ""
    from ipmn.readers import html_section

    return html_section(metrics["readers"])


def _html(data: dict, models: list, metrics: dict, run_dir: Path) -> str:
    from markupsafe import Markup

    from ipmn.splits import fold_counts

    run, splits = data["run"], data["splits"]
    cfg = run.get("resolved_config") or {}
    cohort = run.get("cohort") or {}
    select_metric = (cfg.get("train") or {}).get("select_metric", "balanced_accuracy")
    missing = {m["name"]: m["folds_missing"] for m in models if m["folds_missing"]}
    inputs_vary = len({(tuple(m["modalities"] or []), m["fusion"]) for m in models}) > 1
    archs_vary = len({m["arch"] for m in models}) > 1
    title = ("Table II layout: input modalities and fusion" if inputs_vary and not archs_vary
             else "Table I layout: architectures" if archs_vary and not inputs_vary
             else "Results" if not (archs_vary or inputs_vary) else "Tables I and II layout")
    summary_rows = [[m["label"] or m["name"], f"{len(m['folds_done'])}/{data['n_folds']}",
                     *[format_mean_std(m["summary"][k]) for k in TABLE_METRICS],
                     format_mean_std(m["summary_calibrated"]["ece"])] for m in models]
    return _template().render(
        css=_CSS, run_dir=str(run_dir), written=metrics["written"],
        synthetic=bool((run.get("cohort_info") or {}).get("synthetic")),
        missing=str(missing) if not metrics["complete"] else None,
        cohort={k: cohort.get(k, "?") for k in ("n_cases", "n_patients")}
        | {k: str(cohort.get(k, {})) for k in ("per_class", "per_center")},
        splits=splits, select_metric=select_metric, lr_selected="lr" in (cfg.get("cv") or {}).get("select", []),
        title=title, ddof=DDOF,
        summary_headers=["Method", "folds", *[LABELS[k] for k in TABLE_METRICS], "ECE after T"],
        summary_rows=summary_rows,
        fold_headers=["fold", "train", "test", "epoch", "lr", "T", *[LABELS[k] for k in TABLE_METRICS],
                      "ECE after T", "NLL", "NLL after T"],
        variants=[_variant(v, m, run_dir, select_metric) for v, m in zip(data["variants"], models, strict=True)],
        split_rows=[[r["fold"], str(r["train"]), str(r["test"]), r["test_center"] or ""]
                    for r in fold_counts(splits, models[0]["class_names"] if models else None)],
        split_source=splits.get("source"), cohort_notes=list(cohort.get("notes") or []),
        readers_html=Markup(_readers_html(metrics)),
        metric_names=", ".join(METRICS),
    )
