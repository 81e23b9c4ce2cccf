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
