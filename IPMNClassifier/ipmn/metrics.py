"""Classification metrics, fold summaries and temperature scaling.

Definitions (all computed from per-case class probabilities):

* ``accuracy``, ``balanced_accuracy`` (mean per-class recall over the classes present in ``y_true``);
* ``macro_precision``, ``macro_recall``, ``macro_f1``: scikit-learn macro averages over all
  ``num_classes`` labels with ``zero_division=0`` (as the reference code);
* ``macro_auc``: one-vs-rest ROC AUC per class, averaged over the classes that have both positive
  and negative cases in ``y_true`` (equals scikit-learn's ``roc_auc_score(multi_class="ovr",
  average="macro")`` when every class is present; NaN when no class qualifies);
* ``ece``: expected calibration error of the top-class confidence, 10 equal-width bins;
* ``nll`` (mean negative log-likelihood) and ``brier`` (multi-class Brier score).

Summaries over outer folds are mean ± sample standard deviation (``ddof=1``, stated in every
summary); NaN folds are left out of a metric's summary and counted in ``n``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc",
           "ece", "nll", "brier")
LABELS = {
    "accuracy": "Accuracy", "balanced_accuracy": "Balanced acc.", "macro_precision": "Precision",
    "macro_recall": "Recall", "macro_f1": "F1", "macro_auc": "AUC (OvR)", "ece": "ECE", "nll": "NLL",
    "brier": "Brier",
}  # fmt: skip
DDOF = 1


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)




def auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, dict]:
    from sklearn.metrics import roc_auc_score

    per_class = {}
    for c in range(probs.shape[1]):
        pos = y_true == c
        if pos.any() and (~pos).any():
            per_class[c] = float(roc_auc_score(pos.astype(int), probs[:, c]))
    value = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return value, per_class


def ece_score(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i+1]]; confidence 0 cannot occur with >= 1 class
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Per-bin mean confidence, accuracy and count (for the calibration plot)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        sel = idx == b
        out["count"].append(int(sel.sum()))
        out["confidence"].append(float(conf[sel].mean()) if sel.any() else None)
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else None)
    return out


def classification_metrics(y_true, probs, num_classes: int | None = None) -> dict:
    """All fold metrics from true labels (n,) and class probabilities (n, C)."""
    from sklearn.metrics import (
        accuracy_score,
        brier_score_loss,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y_true)} labels")
    num_classes = int(num_classes or probs.shape[1])
    labels = list(range(num_classes))
    if len(y_true) == 0:
        return {m: float("nan") for m in METRICS} | {"n": 0, "confusion": [[0] * num_classes] * num_classes}
    y_pred = probs.argmax(axis=1)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    auc, per_class_auc = auc_ovr(y_true, probs)
    with warnings.catch_warnings():  # probabilities read back from rounded JSON do not sum to 1 exactly
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        # clipped at 1e-12 (not sklearn's machine epsilon): a confident miss costs 27.6 nats, as before
        nll = float(log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=labels))
        brier = float(brier_score_loss(y_true, probs, labels=labels, scale_by_half=False))
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "macro_auc": auc,
        "auc_per_class": {str(k): v for k, v in per_class_auc.items()},
        "ece": ece_score(y_true, probs),
        "nll": nll,
        "brier": brier,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's balanced accuracy: mean recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # a predicted class absent from y_true is left out, as defined above
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def summarize(fold_metrics: list[dict], names=METRICS, ddof: int = DDOF) -> dict:
    """Mean ± std over folds for each metric (``ddof`` stated; NaN folds left out)."""
    out = {}
    for name in names:
        values = [m.get(name) for m in fold_metrics]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        mean = float(np.mean(finite)) if finite else float("nan")
        std = float(np.std(finite, ddof=ddof)) if len(finite) > ddof else float("nan")
        out[name] = {"mean": mean, "std": std, "ddof": ddof, "n": len(finite), "n_folds": len(values)}
    return out


def pooled_confusion(fold_metrics: list[dict]) -> list[list[int]]:
    mats = [np.asarray(m["confusion"]) for m in fold_metrics if m.get("confusion") is not None]
    return np.sum(mats, axis=0).astype(int).tolist() if mats else []


def fit_temperature(logits, y_true, bounds=(0.05, 20.0)) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    Fitted on validation predictions only (inner folds in nested CV). Returns 1.0 when there is
    nothing to fit on.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)
    if len(y) == 0:
        return 1.0

    def nll(log_t):
        p = softmax(z, math.exp(log_t))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    # Never return a temperature that is worse than no scaling on the fitting data.
    return t if nll(res.x) <= nll(0.0) else 1.0


def format_mean_std(summary_entry: dict, digits: int = 2) -> str:
    mean, std = summary_entry.get("mean"), summary_entry.get("std")
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
