"""Metrics against scikit-learn, fold summaries (ddof=1), ECE, temperature scaling, progress events."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ipmn.metrics import (
    METRICS,
    classification_metrics,
    ece_score,
    fit_temperature,
    format_mean_std,
    pooled_confusion,
    softmax,
    summarize,
)


def _random(n=60, c=3, seed=0, informative=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + (2.0 * np.eye(c)[y] if informative else 0)
    return y, softmax(logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    y, p = _random(seed=seed)
    m = classification_metrics(y, p)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert m["macro_recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert m["n"] == len(y)


def test_missing_class_and_never_predicted_class():
    y = np.array([0, 0, 1, 1, 1, 0])  # no "high" case
    p = np.array(
        [[0.7, 0.2, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]
    )
    m = classification_metrics(y, p, 3)
    pred = p.argmax(1)
    # macro over all three labels with zero_division=0 (reference code), balanced accuracy over present classes
    assert m["macro_precision"] == pytest.approx(
        precision_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert m["macro_recall"] == pytest.approx(
        recall_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    with pytest.warns(UserWarning):
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    # AUC over the classes that have positives and negatives (0 and 1, not 2)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert m["macro_auc"] == pytest.approx(expected)
    assert set(m["auc_per_class"]) == {"0", "1"}


def _hand_written(y, p):
    """The formulas metrics.py computed by hand before it used scikit-learn (the old-vs-new reference)."""
    onehot = np.eye(p.shape[1])[y]
    pred = p.argmax(1)
    recalls = [np.mean(pred[y == c] == c) for c in sorted(set(y.tolist()))]
    return {"nll": float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)))),
            "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
            "balanced_accuracy": float(np.mean(recalls))}


@pytest.mark.parametrize("classes", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_sklearn_nll_brier_balanced_accuracy_equal_the_hand_written_formulas(classes, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    y = rng.integers(0, classes, n)
    y[y == classes - 1] = 0 if seed % 2 else y[y == classes - 1]  # every other seed: a class missing
    p = rng.dirichlet(np.full(classes, 0.3), n)
    p[0] = np.eye(classes)[(y[0] + 1) % classes]  # a confident miss: probability exactly 0 on the truth
    p = np.round(p, 4) if seed >= 3 else p  # as read back from JSON: rows sum to 1 only within 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's warnings about such rows are handled inside
        m = classification_metrics(y, p, classes)
    ref = _hand_written(y, p)
    for name in ("nll", "brier", "balanced_accuracy"):
        assert m[name] == pytest.approx(ref[name], rel=1e-12, abs=1e-15), name


def test_ece():
    # perfectly calibrated in each bin → 0
    y = np.array([0] * 8 + [1] * 2)
    p = np.tile([0.8, 0.2, 0.0], (10, 1))
    assert ece_score(y, p) == pytest.approx(0.0, abs=1e-12)
    # always 90 % confident and always wrong → 0.9
    y = np.ones(10, dtype=int)
    p = np.tile([0.9, 0.05, 0.05], (10, 1))
    assert ece_score(y, p) == pytest.approx(0.9)
    # two bins, hand-computed
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.95, 0.05, 0], [0.95, 0.05, 0], [0.6, 0.4, 0], [0.6, 0.4, 0]])
    assert ece_score(y, p) == pytest.approx(0.5 * abs(1 - 0.95) + 0.5 * abs(0 - 0.6))


def test_summary_uses_sample_std():
    folds = [{"accuracy": a, "macro_auc": u} for a, u in [(0.5, 0.7), (0.7, float("nan")), (0.9, 0.9)]]
    s = summarize(folds)
    assert s["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert s["accuracy"]["ddof"] == 1
    assert s["macro_auc"]["n"] == 2 and s["macro_auc"]["n_folds"] == 3
    assert math.isnan(summarize([{"accuracy": 0.5}])["accuracy"]["std"])  # one fold: no std
    assert format_mean_std(s["accuracy"]) == "0.70 ± 0.20"
    assert set(METRICS) <= set(s)


def test_pooled_confusion():
    assert pooled_confusion([{"confusion": [[1, 0], [0, 1]]}, {"confusion": [[0, 2], [1, 0]]}]) == [
        [1, 2],
        [1, 1],
    ]


def test_temperature_scaling_reduces_nll_on_overconfident_logits():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3)) + 1.0 * np.eye(3)[y]
    hot = 6.0 * logits  # overconfident
    t = fit_temperature(hot, y)
    assert 3.0 < t < 12.0

    def nll(z, temp):
        p = softmax(z, temp)
        return -np.mean(np.log(p[np.arange(len(y)), y]))

    assert nll(hot, t) < nll(hot, 1.0)
    assert softmax(hot, t).argmax(1).tolist() == hot.argmax(1).tolist()  # accuracy unchanged
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0


def test_progress_jsonl_events_are_valid_json():
    from ipmn.progress import Progress

    buf = io.StringIO()
    p = Progress("jsonl", stream=buf).child(model="vit", fold=1)
    p.stage("train", "hello")
    p.epoch(1, 3, train_loss=float("nan"), val_loss=0.5, val_acc=np.float64(0.25), eta_s=1.0)
    p.fold_done(1, {"accuracy": 0.5})
    p.done("/tmp/x")
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["stage", "epoch", "fold_done", "done"]
    ep = events[1]
    assert ep["fold"] == 1 and ep["model"] == "vit" and ep["epoch"] == 1 and ep["epochs"] == 3
    assert ep["train_loss"] is None and ep["val_acc"] == 0.25 and ep["eta_s"] == 1.0
    assert events[2]["metrics"] == {"accuracy": 0.5}
    silent = io.StringIO()
    Progress("none", stream=silent).epoch(1, 2, 0.1)
    assert silent.getvalue() == ""
