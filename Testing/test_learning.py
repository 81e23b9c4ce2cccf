"""The demo recipe learns the task, not just "lesion vs normal" (slow: a few minutes on 2 cores).

A ViT trained from scratch with the ``demo`` preset on freshly generated phantoms, scored on held-out
low- and high-risk phantoms (normal cases are left out: a model that only sees fluid separates normal from
the rest). Two checks on the one trained model:

* it ranks the high-risk cases whose finding is a dilated main duct or a large cyst with a thick wall above
  the low-risk cysts: AUC >= 0.7 (measured 1.000; 0.767 before the preset's lesion-map loss). With 14 such
  cases against 30 low-risk ones a random ranking's AUC has a standard deviation of about 0.095, so 0.7 is
  2.1 of them above chance (p ~ 0.02); a model that only tells lesion from normal ranks these at chance;
* it ranks all high-risk cases above low-risk ones with AUC >= 0.7 (30 vs 30: a random AUC's standard
  deviation is about 0.075, so 2.7 of them above chance). Since the phantoms' nodule cases draw their
  cysts as low-risk cases do (generator version 2), the nodule cases count here on their own merit.
  Measured 0.770 (nodule vs low 0.569: 18 nodule cases in 90 phantoms are too few to learn the nodule
  from; the shipped model, trained on 1080, finds most). Without the lesion-map loss this test measured
  0.679 with the previous preset (distillation from a CNN teacher, no lesion-map loss) and was a strict
  expected failure.

The preset is trained on 90 phantoms (30 per class, the session's ``learning_cohort``, which the nested
CV learning test also uses) for 20 epochs (the shipped model: 1080 phantoms, 16 epochs), on one torch
thread (on a shared 2-core machine two threads are several times slower) while a
second process renders and preprocesses the held-out phantoms.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from conftest import cached_lesion_cohort

LEARN_TRAIN = {"epochs": 20}
HELD_OUT_PER_CLASS = 30


@pytest.fixture(scope="module")
def held_out_scores(learning_cohort, tmp_path_factory, one_torch_thread):
    """Train the preset once; its P(high) on the held-out phantoms, with their truth."""
    import torch

    from ipmn.cohort import load_manifest
    from ipmn.config import load_config, resolve_config
    from ipmn.models import load_package
    from ipmn.train import train_model
    from ipmn.windows import load_grids, predict_cases, prepare_arrays

    base = tmp_path_factory.mktemp("learning")
    train_cases = load_manifest(learning_cohort)
    raw = load_config("demo")
    raw["train"].update(LEARN_TRAIN)
    raw["data"] = {"cache_dir": str(base / "cache")}
    cfg = resolve_config(raw)
    # the held-out phantoms are rendered and preprocessed on the second core while the first one trains
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        held_out = pool.submit(cached_lesion_cohort, base / "test", HELD_OUT_PER_CLASS, 32, (1, 2), cfg)
        summary = train_model(train_cases, cfg, base / "run", device="cpu")
        test_cases = load_manifest(held_out.result())
    model, _ = load_package(summary["package"])
    arrays = prepare_arrays(test_cases, load_grids(test_cases, cfg), cfg, None)
    logp = predict_cases(model.float(), [arrays[c.case_id] for c in test_cases], cfg["model"]["k"], "central",
                         torch.device("cpu"), contextlib.nullcontext())
    probs = np.exp(logp)
    y = np.array([c.label for c in test_cases])
    assert sorted(np.bincount(y, minlength=3)) == [0, HELD_OUT_PER_CLASS, HELD_OUT_PER_CLASS]
    scenario = np.array([c.extra["scenario"] for c in test_cases])
    return y, scenario, probs[:, 2]


@pytest.mark.slow
def test_demo_recipe_ranks_dilated_ducts_and_large_cysts_above_low_risk_cysts(held_out_scores):
    from sklearn.metrics import roc_auc_score

    y, scenario, score = held_out_scores
    keep = (y == 1) | np.isin(scenario, ["duct", "large"])
    assert 8 <= (keep & (y == 2)).sum() <= 20
    auc = roc_auc_score(y[keep] == 2, score[keep])
    print(f"\nlearning test: held-out AUC, duct/large high-risk vs low-risk {auc:.3f} "
          f"({(keep & (y == 2)).sum()} vs {(y == 1).sum()} cases)")
    assert auc >= 0.7


@pytest.mark.slow
def test_demo_recipe_ranks_high_above_low_on_held_out_phantoms(held_out_scores):
    from sklearn.metrics import roc_auc_score

    y, scenario, score = held_out_scores
    auc = roc_auc_score(y == 2, score)
    nodule = (y == 1) | (scenario == "nodule")
    auc_nodule = roc_auc_score(y[nodule] == 2, score[nodule])
    print(f"\nlearning test: held-out AUC low vs high {auc:.3f}; nodule vs low {auc_nodule:.3f}")
    assert auc >= 0.7
