"""`ipmn demo` (what `make demo` runs): the bundled sample case through the bundled demo model.

The sample is a high-risk phantom whose only high-risk finding is a mural nodule. The demo model must
grade it high with the central window and must stop grading it high when the same phantom is rebuilt
without its nodule (same anatomy, geometry and noise): a model that keys on cyst fluid, ROI size or
chance fails the ablation.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, run_cli
from ipmn.demo import demo_model, sample_case
from ipmn.models import read_package_config

pytestmark = pytest.mark.skipif(not (REPO / "Resources" / "DemoModel" / "config.json").exists(),
                                reason="demo model not built (make demo-model)")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`ipmn demo` once for the module, as `make demo` runs it (all windows)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    t = time.perf_counter()
    proc = run_cli("demo", "--out", out, "--device", "cpu")
    print(f"ipmn demo took {time.perf_counter() - t:.1f} s including start-up")
    return proc, out


def test_demo_runs_on_the_sample(demo_run):
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "prediction.json").read_text())
    assert sample_case()["label"] == "high"
    assert result["predicted_class"] in ("normal", "low", "high")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "not for clinical use" in proc.stdout.lower()
    assert (out / "attention.nii.gz").exists()


def _central(predictor, case: dict, out):
    return predictor.predict(t1=case["t1"], t2=case["t2"], roi=case["roi"], out=out, windows="central")


def test_demo_grades_the_sample_high(demo_run):
    proc, out = demo_run
    result = json.loads((out / "prediction.json").read_text())
    assert result["predicted_class"] == "high", result["probabilities"]


def test_sample_high_with_central_window_and_attention_on_the_lesion(tmp_path):
    from scipy.ndimage import distance_transform_edt

    from ipmn.predict import Predictor

    case = sample_case()
    result = _central(Predictor(demo_model(), device="cpu", precision="fp32"), case, tmp_path / "c")
    probs = result["probabilities"]
    assert result["predicted_class"] == "high" and probs["high"] >= 0.8, probs
    # attention maximum (T1 geometry) within 5 mm of the cyst or nodule
    heat_img = sitk.ReadImage(str(tmp_path / "c" / "attention.nii.gz"))
    lesion_img = sitk.ReadImage(str(case["t1"].parent / case["info"]["lesion"]))
    heat = sitk.GetArrayFromImage(heat_img)
    lesion = sitk.GetArrayFromImage(lesion_img) > 0
    assert heat.shape == lesion.shape
    dist = distance_transform_edt(~lesion, sampling=lesion_img.GetSpacing()[::-1])
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert dist[peak] <= 5.0, f"attention maximum {dist[peak]:.1f} mm from the lesion"


def test_removing_the_nodule_removes_the_high_grade(tmp_path):
    from ipmn.phantoms import make_case, write_case
    from ipmn.predict import Predictor

    args = dict(sample_case()["info"]["make_case"])
    args["t1_shape"], args["t2_shape"] = tuple(args["t1_shape"]), tuple(args["t2_shape"])
    with_nodule = make_case(**args)
    without = make_case(**args, nodule=False)
    assert without["info"]["nodule_removed"]
    predictor = Predictor(demo_model(), device="cpu", precision="fp32")
    graded = {}
    for name, case in (("with", with_nodule), ("without", without)):
        paths = write_case(case, tmp_path / name, "c")
        graded[name] = _central(predictor, {k: paths[k] for k in ("t1", "t2", "roi")}, None)
    assert graded["with"]["predicted_class"] == "high", graded["with"]["probabilities"]
    assert graded["without"]["predicted_class"] != "high", graded["without"]["probabilities"]
    assert graded["without"]["probabilities"]["high"] < graded["with"]["probabilities"]["high"] - 0.3


def test_demo_model_card_is_honest():
    config = read_package_config(demo_model())
    card = config.get("card", "").lower()
    assert "phantom" in card and "not for clinical use" in card
    assert (demo_model() / "model.safetensors").stat().st_size < 25 * 1024**2
