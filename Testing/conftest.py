"""Shared fixtures: phantom cases and a small phantom cohort written to temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("IPMN_CACHE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "ipmn-test-cache"))


def run_cli(*args, timeout=600, input=None, env=None):
    """Run ``python -m ipmn ARGS`` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ipmn", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=full_env,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: run-to-run identical, and far faster on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_cohort(tmp_path_factory) -> Path:
    """18 phantoms (6 per class, 2 centres), written once per session (train and CV tests share it)."""
    from ipmn.phantoms import make_cohort

    base = tmp_path_factory.getbasetemp() / "ipmn_phantoms18"
    manifest = base / "cohort.csv"
    if not manifest.exists():
        make_cohort(base, n=18, seed=5, centers=2)
    return manifest


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """12 phantom cases (4 per class) with cohort.csv, generated once per session."""
    from ipmn.phantoms import make_cohort

    out = tmp_path_factory.mktemp("cohort12")
    manifest = make_cohort(out, n=12, seed=7)
    return manifest


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory):
    """One high-risk phantom case written to disk: dict of paths plus the in-memory case."""
    from ipmn.phantoms import make_case, write_case

    case = make_case(seed=11, label=2)
    out = tmp_path_factory.mktemp("case")
    paths = write_case(case, out, "case")
    return {"case": case, **{k: Path(v) for k, v in paths.items()}}


# ------------------------------------------------------------------------------------------------ learning tests
LEARN_TRAIN_N, LEARN_TRAIN_SEED = 90, 31


def _lesion_case_row(job: tuple) -> dict:
    """Render and write one phantom (runs in a worker process); its cohort.csv row."""
    from ipmn.phantoms import make_case, write_case
    from ipmn.vocab import CLASS_NAMES

    out, case_id, case_seed, label = job
    case = make_case(case_seed, label)
    paths = write_case(case, out / "cases", case_id)
    return {"case_id": case_id, "label": CLASS_NAMES[label], "center": "A",
            **{k: p.relative_to(out).as_posix() for k, p in paths.items()},
            "scenario": case["info"].get("scenario", "")}


def lesion_cohort(out: Path, n_per_class: int, seed: int, labels=(1, 2), workers: int = 2) -> Path:
    """Phantoms of the given classes only, ``n_per_class`` each (a held-out set that scores low vs high
    needs no normal cases); each case's seed is drawn from ``seed`` as :func:`ipmn.phantoms.make_cohort`
    draws them. Returns the manifest."""
    import csv
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).spawn(n_per_class * len(labels))
    jobs = [(out, f"ph{i:03d}", int(np.random.default_rng(ss).integers(0, 2**31)), labels[i % len(labels)])
            for i, ss in enumerate(seeds)]
    if workers == 1:
        rows = list(map(_lesion_case_row, jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_lesion_case_row, jobs))
    manifest = out / "cohort.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="session")
def learning_cohort(tmp_path_factory) -> Path:
    """90 phantoms (30 per class, seed 31) rendered once per session: the training set of the slow learning
    test (test_learning) and, a subset of it, the cohort of the nested-CV learning test (test_cv)."""
    from ipmn.phantoms import make_cohort

    return make_cohort(tmp_path_factory.mktemp("learning_train"), n=LEARN_TRAIN_N, seed=LEARN_TRAIN_SEED, workers=2)


def cached_lesion_cohort(out: Path, n_per_class: int, seed: int, labels, cfg: dict) -> Path:
    """:func:`lesion_cohort` on one core, then its cases preprocessed into ``cfg``'s grid cache: run in a
    background process while the main process trains on one torch thread, so that both cores work."""
    import SimpleITK as sitk

    from ipmn.cohort import load_manifest
    from ipmn.windows import load_grids

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    manifest = lesion_cohort(out, n_per_class, seed, labels, workers=1)
    load_grids(load_manifest(manifest), cfg)
    return manifest
