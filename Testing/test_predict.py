"""``ipmn predict`` end to end with small real models; the attention map's trip back to patient space."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cli
from ipmn.device import resolve_precision
from ipmn.errors import IPMNError
from ipmn.models import build_model, save_package, vit_branches
from ipmn.phantoms import make_case, write_case
from ipmn.predict import Predictor

TINY = {"arch": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 48, "num_heads": 3}
FAST_PRE = {"n4": False, "smoothing": "none"}


def _package(folder, seed=0, **over):
    torch.manual_seed(seed)
    cfg = {**TINY, **over}
    model = build_model(cfg)
    save_package(folder, model, {**cfg, "name": "tiny-test", "card": "random weights, for tests",
                                 "preprocess": FAST_PRE})
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _package(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    case = make_case(5, 1, t1_shape=(128, 128, 40), t2_shape=(144, 144, 30), t1_orientation="RAS",
                     t2_orientation="PLS")
    return write_case(case, tmp_path_factory.mktemp("small"), "c")


def test_predict_cli_end_to_end(tiny_model, small_case, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("predict", "--t1", small_case["t1"], "--t2", small_case["t2"], "--roi", small_case["roi"],
                   "--model", tiny_model, "--out", out, "--device", "cpu", "--fidelity")
    assert proc.returncode == 0, proc.stderr
    assert "model tiny-test" in proc.stdout
    result = json.loads((out / "prediction.json").read_text())
    assert result["schema"] == "ipmn.prediction/1"
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["predicted_class"] in ("normal", "low", "high")
    assert result["predicted_class"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["windows"]["mode"] == "central" and len(result["windows"]["starts"]) == 1
    assert result["explanation"]["method"] == "attention_rollout"
    assert 0 <= result["explanation"]["deletion_auc"] <= 1
    for stage in ("read", "n4", "resample", "model_and_explain", "maps", "write", "total"):
        assert stage in result["timing_s"] or stage == "n4"
    t1 = sitk.ReadImage(str(small_case["t1"]))
    for name in ("attention.nii.gz", "attention_labels.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == t1.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), t1.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetSpacing(), t1.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(img.GetDirection(), t1.GetDirection(), atol=1e-6)
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention_labels.nii.gz")))
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == 3).any()
    n1, n3 = (labels >= 1).sum(), (labels == 3).sum()
    assert 2.5 < n1 / n3 < 6  # top 20 % vs top 5 % of the same voxels
    assert (out / "grid.png").stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_all_windows_tta_and_ensemble(tiny_model, small_case, tmp_path):
    other = _package(tmp_path / "other", seed=1)
    predictor = Predictor([tiny_model, other], device="cpu")
    result = predictor.predict(t1=small_case["t1"], t2=small_case["t2"], roi=small_case["roi"],
                               windows="all", tta=True, fidelity=False)
    assert len(result["windows"]["starts"]) == result["windows"]["n_roi_slices"] - 8
    assert result["uncertainty"]["ensemble_std"] is not None
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    single = Predictor(tiny_model, device="cpu").predict(t1=small_case["t1"], t2=small_case["t2"],
                                                         roi=small_case["roi"], fidelity=False)
    assert single["uncertainty"]["ensemble_std"] is None


def test_tta_of_a_flips_only_model_never_turns_the_grid(tiny_model, small_case, tmp_path, monkeypatch):
    """A model trained without quarter turns (train.quarter_turns: false, recorded in its config) is shown
    only the flipped views at test time; a model trained with turns also gets the turned ones."""
    import ipmn.augment

    real, seen = ipmn.augment.tta_transforms, []

    def spy(*args, **kwargs):
        pairs = real(*args, **kwargs)
        seen.append([fwd.name for fwd, _ in pairs])
        return pairs

    monkeypatch.setattr(ipmn.augment, "tta_transforms", spy)
    torch.manual_seed(0)
    flips = tmp_path / "flips"
    save_package(flips, build_model(TINY), {**TINY, "name": "flips", "card": "random weights, for tests",
                                            "preprocess": FAST_PRE, "training": {"augmentation": "flips"}})
    kw = {"t1": small_case["t1"], "t2": small_case["t2"], "roi": small_case["roi"], "tta": True, "fidelity": False}
    Predictor(flips, device="cpu").predict(**kw)
    Predictor(tiny_model, device="cpu").predict(**kw)
    assert seen[0] == ["identity", "hflip", "rot180"]
    assert seen[-1] == ["identity", "hflip", "rot90", "rot180", "rot270"]


def _forced_attention_model(folder, token):
    """A 1-layer ViT whose every query attends to patch ``token`` (1-based, 0 = class token)."""
    torch.manual_seed(0)
    cfg = {**TINY, "depth": 1}
    model = build_model(cfg)
    vit = vit_branches(model)[0]
    d = vit.pos_embed.shape[-1]
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        vit.cls_token.zero_()
        vit.pos_embed.zero_()
        vit.pos_embed[0, token, 0] = 5.0  # only this token carries a signal
        blk = vit.blocks[0]
        blk.norm1.weight.fill_(1.0)
        blk.norm1.bias.zero_()
        qkv = blk.attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        ln_dir = torch.nn.functional.layer_norm(vit.pos_embed[0, token], (d,))
        heads = blk.attn.num_heads
        hd = d // heads
        for h in range(heads):
            qkv.bias[h * hd] = 1.0  # q: constant
            qkv.weight[d + h * hd] = 50.0 * ln_dir / ln_dir.norm()  # k: large only for that token
    save_package(folder, model, {**cfg, "name": "forced", "preprocess": FAST_PRE})
    return folder


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_forced_attention_peak_reaches_the_right_t1_voxel(tmp_path, orientation):
    row, col = 5, 9  # patch (row 5, column 9) of the 12x12 token grid -> cell (1, 2) = slice start+5
    token = 1 + row * 12 + col
    model_dir = _forced_attention_model(tmp_path / "forced", token)
    case = make_case(8, 0, t1_shape=(128, 128, 40), t2_shape=(128, 128, 40), t1_orientation=orientation,
                     t2_orientation=orientation)
    paths = write_case(case, tmp_path / "case", "c")
    predictor = Predictor(model_dir, device="cpu")
    result = predictor.predict(t1=paths["t1"], t2=paths["t2"], roi=paths["roi"], out=tmp_path / "out",
                               fidelity=False)
    heat = sitk.ReadImage(str(tmp_path / "out" / "attention.nii.gz"))
    arr = sitk.GetArrayFromImage(heat)
    z, y, x = np.unravel_index(np.argmax(arr), arr.shape)
    peak_lps = heat.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
    from ipmn.grid import RoiGrid

    grid = RoiGrid.from_dict(result["input_geometry"]["grid"])
    gi = grid.reference_image().TransformPhysicalPointToContinuousIndex(peak_lps)
    start = result["windows"]["starts"][0]
    cell_row, cell_col = row // 4, col // 4
    expected_slice = start + cell_row * 3 + cell_col
    assert abs(gi[2] - expected_slice) < 0.6, (gi, expected_slice)
    # in-cell pixel range of that patch: rows/cols (row % 4) * 16 ... + 16
    assert (row % 4) * 16 - 1 <= gi[1] <= (row % 4) * 16 + 16, gi
    assert (col % 4) * 16 - 1 <= gi[0] <= (col % 4) * 16 + 16, gi


def test_bad_model_and_device(small_case, tmp_path, tiny_model):
    base = ["predict", "--t1", small_case["t1"], "--t2", small_case["t2"], "--roi", small_case["roi"]]
    proc = run_cli(*base, "--model", tmp_path / "nope", "--out", tmp_path / "o1")
    assert proc.returncode == 2 and "model package not found" in proc.stderr
    assert not (tmp_path / "o1").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc = run_cli(*base, "--model", broken, "--out", tmp_path / "o2")
    assert proc.returncode == 2 and "ipmn: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("predict", "--t1", small_case["t1"], "--roi", small_case["roi"], "--model", tiny_model,
                   "--out", tmp_path / "o3")
    assert proc.returncode == 2 and "T2 needed" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_cli(*base, "--model", tiny_model, "--out", tmp_path / "o4", "--device", "cuda")
        assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    proc = run_cli(*base, "--model", tiny_model, "--out", tmp_path / "o5", "--device", "cpu", "--precision", "fp16")
    assert proc.returncode == 2 and "fp16 needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    for out in ("o2", "o3", "o4", "o5"):
        assert not (tmp_path / out / "prediction.json").exists()


def test_precision_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, native_cpu_bf16=True) == "bf16"
    assert resolve_precision("auto", cpu, native_cpu_bf16=False) == "fp32"  # emulated bf16 is slower than fp32
    assert resolve_precision("fp32", cpu, native_cpu_bf16=True) == "fp32"
    assert resolve_precision("bf16", cpu, native_cpu_bf16=False) == "bf16"
    with pytest.raises(IPMNError, match="unknown precision"):
        resolve_precision("int8", cpu)


def test_bf16_prediction_matches_fp32(small_case, tmp_path):
    """bf16 autocast (the CPU default where the hardware has it) gives fp32's answer and map."""
    model_dir = _package(tmp_path / "deeper", seed=3, depth=4)
    kw = {"t1": small_case["t1"], "t2": small_case["t2"], "roi": small_case["roi"], "windows": "all", "tta": True}
    runs = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model_dir, device="cpu", precision=precision)
        runs[precision] = predictor.predict(**kw, out=tmp_path / precision)
        assert runs[precision]["precision"] == precision
    p32 = np.array(list(runs["fp32"]["probabilities"].values()))
    p16 = np.array(list(runs["bf16"]["probabilities"].values()))
    assert np.abs(p32 - p16).max() < 0.01, (p32, p16)
    assert not np.array_equal(p32, p16)  # bf16 really ran
    h32, h16 = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / p / "attention.nii.gz"))) for p in ("fp32", "bf16"))
    inside = (h32 > 0) | (h16 > 0)
    assert np.corrcoef(h32[inside], h16[inside])[0, 1] > 0.98
    assert np.abs(h32 - h16).max() < 0.1


def test_worker_keeps_model_between_requests(tiny_model, small_case, tmp_path):
    reqs = [
        {"cmd": "predict", "t1": str(small_case["t1"]), "t2": str(small_case["t2"]), "roi": str(small_case["roi"]),
         "model": str(tiny_model), "out": str(tmp_path / f"w{i}"), "device": "cpu", "fidelity": False}
        for i in range(2)
    ]
    reqs.insert(1, {"cmd": "predict", "t1": "/nope.nii.gz", "t2": "/nope.nii.gz", "roi": str(small_case["roi"]),
                    "model": str(tiny_model), "out": str(tmp_path / "bad")})
    stdin = "\n".join(json.dumps(r) for r in reqs) + "\n" + json.dumps({"cmd": "quit"}) + "\n"
    proc = run_cli("worker", input=stdin)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "ready"
    kinds = [e["event"] for e in events if e["event"] in ("done", "error")]
    assert kinds == ["done", "error", "done"]
    assert sum(1 for e in events if e.get("stage") == "load_model") == 1
    assert (tmp_path / "w1" / "prediction.json").exists()
