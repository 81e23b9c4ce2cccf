"""`ipmn demo` (what `make demo` runs): the bundled sample case through the bundled demo model."""

from __future__ import annotations

import json
import time

import pytest

from conftest import REPO, run_cli
from ipmn.demo import demo_model, sample_case
from ipmn.models import read_package_config

pytestmark = pytest.mark.skipif(not (REPO / "Resources" / "DemoModel" / "config.json").exists(),
                                reason="demo model not built (make demo-model)")


def test_demo_predicts_the_sample_label(tmp_path):
    t = time.perf_counter()
    proc = run_cli("demo", "--out", tmp_path / "demo", "--device", "cpu")
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "demo" / "prediction.json").read_text())
    truth = sample_case()["label"]
    assert result["predicted_class"] == truth, (result["probabilities"], truth)
    assert result["windows"]["mode"] == "all" and len(result["windows"]["starts"]) > 1
    assert "not for clinical use" in proc.stdout.lower()
    print(f"ipmn demo took {elapsed:.1f} s including start-up")


def test_demo_model_card_is_honest():
    config = read_package_config(demo_model())
    card = config.get("card", "").lower()
    assert "phantom" in card and "not for clinical use" in card
    assert (demo_model() / "model.safetensors").stat().st_size < 25 * 1024**2
