"""report.html from its Jinja2 template, on a hand-built two-fold run folder (no training)."""

from __future__ import annotations

import html
import json
import re

import numpy as np

from ipmn.report import write_report

NAMES = ["normal", "low", "high"]


def _fold(k: int, rng, test_center: str) -> dict:
    y = rng.integers(0, 3, 9)
    probs = rng.dirichlet(np.ones(3), 9)
    preds = [{"case_id": f"c{k}{i}", "true": int(t), "probs": p.tolist(), "probs_calibrated": p.tolist()}
             for i, (t, p) in enumerate(zip(y, probs, strict=True))]
    from ipmn.metrics import classification_metrics

    m = classification_metrics(y, probs, 3)
    return {"fold": k, "selected": {"lr": 1e-4, "epoch": 3 + k}, "temperature": 1.5, "metrics": m,
            "metrics_calibrated": m, "n_train": 18, "n_test": 9, "test_center": test_center, "predictions": preds,
            "final_history": [], "inner_curves": [], "examples": [], "class_names": NAMES}


def _run(folder, rng, complete=True):
    variant = {"name": "vit_tiny", "label": "ViT <tiny> & co", "arch": "vit_tiny", "modalities": ["t1", "t2"],
               "fusion": "early", "model": {"class_names": NAMES}}
    cases = [{"case_id": f"c{k}{i}", "label": i % 3, "patient_id": f"c{k}{i}", "center": "A"}
             for k in range(2) for i in range(9)]
    splits = {"outer": 2, "inner": 2, "seed": 7, "group_by": "patient", "stratified_by": "label", "cases": cases,
              "folds": [{"fold": k, "train": [c["case_id"] for c in cases if not c["case_id"].startswith(f"c{k}")],
                         "test": [c["case_id"] for c in cases if c["case_id"].startswith(f"c{k}")],
                         "test_center": "<A&B>"} for k in range(2)]}
    run = {"variants": [variant], "resolved_config": {"train": {"select_metric": "macro_f1"}, "cv": {"select": ["lr"]}},
           "cohort_info": {"synthetic": True}, "cohort": {"n_cases": 18, "n_patients": 18, "per_class": {"normal": 6},
                                                          "per_center": {"A": 18}}}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "splits.json").write_text(json.dumps(splits))
    for k in range(2 if complete else 1):
        d = folder / "vit_tiny" / f"fold_{k}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(_fold(k, rng, "<A&B>")))


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_report_html_tables_escaping_and_notes(tmp_path):
    _run(tmp_path, np.random.default_rng(0))
    write_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</body></html>")
    assert "<tiny>" not in page and "&lt;tiny&gt; &amp; co" in page and "<A&B>" not in page  # escaped
    text = _text(page)
    assert "Synthetic phantoms." in text and "Partial report" not in text
    assert "epoch and learning rate by mean inner-validation macro_f1" in text
    assert "Cohort: 18 cases, 18 patients; per class {'normal': 6}" in text
    assert page.count("<tr>") == 2 + 3 + 3  # summary (header + 1), folds (header + 2), splits (header + 2)
    acc = metrics["models"][0]["summary"]["accuracy"]
    assert f"{acc['mean']:.2f} ± {acc['std']:.2f}" in text
    assert f"ViT <tiny> & co 2/2 {acc['mean']:.2f}" in text
    assert "0 (<A&B>) 18 9 3 0.000100 1.50" in text
    assert page.count("data:image/png;base64,") >= 3  # confusion, ROC, calibration (no learning curves)


def test_partial_report_names_the_missing_folds(tmp_path):
    _run(tmp_path, np.random.default_rng(1), complete=False)
    write_report(tmp_path)
    text = _text((tmp_path / "report.html").read_text())
    assert "Partial report. Folds still missing: {'vit_tiny': [1]}." in text
    assert "ViT <tiny> & co 1/2" in text
