"""Model zoo, configs, local pretrained weights and model packages (real, small models; no network)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ipmn import CLASS_NAMES
from ipmn.errors import IPMNError
from ipmn.models import (
    MODEL_KEYS,
    AlexNet,
    LateFusionViT,
    build_model,
    gradcam_target_layer,
    is_vit,
    load_package,
    normalize_config,
    save_package,
    vit_blocks,
)
from ipmn.models.cnn import build_cnn

TINY = dict(arch="vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=3)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


def test_normalize_config_defaults():
    cfg = normalize_config({})
    assert cfg["arch"] == "vit_base_patch16_224"
    assert cfg["modalities"] == ["t1", "t2"] and cfg["fusion"] == "early"
    assert (cfg["k"], cfg["cell"], cfg["img_size"]) == (9, 64, 192)
    assert cfg["num_classes"] == 3 and cfg["class_names"] == list(CLASS_NAMES)
    assert cfg["pretrained"] is None and cfg["drop_rate"] == 0.0
    assert set(cfg) == set(MODEL_KEYS)
    json.dumps(cfg)  # JSON-able
    assert normalize_config(dict(k=16, cell=48))["img_size"] == 192


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(depht=6), r"depht.*valid keys: arch"),
        (dict(arch="vit_bse_patch16_224"), r"unknown arch.*vit_base_patch16_224"),
        (dict(arch="resnet19"), r"unknown arch.*densenet121"),
        (dict(k=8), r"perfect square"),
        (dict(img_size=224), r"img_size must equal sqrt\(k\) \* cell = 192"),
        (dict(modalities=["t1", "flair"]), r"modalities"),
        (dict(modalities=["t1", "t1"]), r"modalities"),
        (dict(fusion="mid"), r"fusion"),
        (dict(fusion="late", modalities=["t1"]), r"two modalities"),
        (dict(fusion="late", arch="resnet18"), r"late fusion is only available for ViTs"),
        (dict(arch="resnet18", depth=6), r"depth is a ViT setting"),
        (dict(num_classes=2), r"class_names must be given"),
        (dict(class_names=["a", "b"]), r"class_names must be a list of 3"),
        (dict(drop_rate=1.5), r"drop_rate"),
        (dict(patch_size=10), r"multiple of patch_size"),
        (dict(pretrained=3), r"pretrained"),
        ("vit", r"mapping"),
    ],
)
def test_normalize_config_refusals(cfg, match):
    with pytest.raises(IPMNError, match=match):
        normalize_config(cfg)


def test_import_models_is_light():
    code = (
        "import sys, ipmn.models, ipmn.explain; "
        "bad = [m for m in ('monai', 'sklearn', 'matplotlib', 'timm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_build_model_wraps_timm_errors():
    with pytest.raises(IPMNError, match="cannot build"):
        build_model(dict(TINY, embed_dim=50))  # not divisible by 3 heads
    with pytest.raises(IPMNError, match="drop_path_rate"):
        build_model(dict(arch="densenet121", drop_path_rate=0.1))  # timm DenseNet has no drop path
    with pytest.raises(IPMNError, match="alexnet"):
        build_model(dict(arch="alexnet", pretrained="hub"))


# --------------------------------------------------------------------------------------------------
# zoo: forward + backward on a (2, C, 192, 192) batch
# --------------------------------------------------------------------------------------------------

ZOO = [
    pytest.param(TINY, id="vit_tiny_depth2"),
    pytest.param(dict(TINY, fusion="late"), id="vit_late_fusion"),
    pytest.param(dict(arch="densenet121"), id="densenet121"),
    pytest.param(dict(arch="resnet18"), id="resnet18"),
    # efficientnet_b5 costs ~5 s (idle machine) to ~50 s (busy) here: the default run checks its
    # code path with efficientnet_b0 (same timm EfficientNet class and Grad-CAM layer), b5 is "slow"
    pytest.param(dict(arch="efficientnet_b0"), id="efficientnet_b0_for_b5"),
    pytest.param(dict(arch="efficientnet_b5"), id="efficientnet_b5", marks=pytest.mark.slow),
    pytest.param(dict(arch="mobilenetv2_100"), id="mobilenetv2_100"),
    pytest.param(dict(arch="alexnet"), id="alexnet"),
    pytest.param(dict(arch="smallcnn"), id="smallcnn"),
    pytest.param(dict(TINY, modalities=["t2"]), id="vit_tiny_t2_only"),
    pytest.param(dict(arch="resnet18", modalities=["t1"]), id="resnet18_t1_only"),
]


@pytest.mark.parametrize("cfg", ZOO)
def test_zoo_forward_backward(cfg, no_network):
    torch.manual_seed(0)
    if cfg["arch"] == "efficientnet_b0":  # not a zoo arch: built through the CNN builder directly
        model = build_cnn(dict(normalize_config(dict(cfg, arch="efficientnet_b5")), arch="efficientnet_b0"))
    else:
        model = build_model(cfg)
    chans = len(cfg.get("modalities", ["t1", "t2"]))
    x = torch.rand(2, chans, 192, 192)
    logits = model(x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    vit = cfg["arch"].startswith("vit")
    assert is_vit(model) == vit
    if not vit:
        layer = "bn2" if cfg["arch"] == "efficientnet_b0" else gradcam_target_layer(model)
        assert layer in dict(model.named_modules())
    else:
        assert len(vit_blocks(model)) == 2 * (2 if cfg.get("fusion") == "late" else 1)
        for blk in vit_blocks(model):
            assert blk.attn.num_heads == 3


def test_efficientnet_b5_builds():
    model = build_model(dict(arch="efficientnet_b5"))
    assert model.conv_stem.in_channels == 2 and model.classifier.out_features == 3
    assert gradcam_target_layer(model) == "bn2" and "bn2" in dict(model.named_modules())
    assert 27e6 < sum(p.numel() for p in model.parameters()) < 30e6


def test_late_fusion_structure():
    torch.manual_seed(0)
    model = build_model(dict(TINY, fusion="late"))
    assert isinstance(model, LateFusionViT)
    assert list(model.branches) == ["t1", "t2"]
    for branch in model.branches.values():
        assert branch.patch_embed.proj.in_channels == 1
        assert branch.pos_embed.shape == (1, 145, 48)
    assert model.head.in_features == 96 and model.norm.normalized_shape == (96,)
    model.eval()
    x = torch.rand(1, 2, 192, 192)
    # channel i feeds branch i: changing T2 only changes the T2 branch's features
    x2 = x.clone()
    x2[:, 1] = torch.rand(192, 192)
    with torch.no_grad():
        f1, f2 = model.forward_features(x), model.forward_features(x2)
    assert torch.allclose(f1[:, :48], f2[:, :48]) and not torch.allclose(f1[:, 48:], f2[:, 48:])


def test_alexnet_shapes():
    model = AlexNet(in_chans=2, num_classes=3)
    feats = model.features(torch.rand(1, 2, 192, 192))
    assert feats.shape == (1, 256, 5, 5)
    assert isinstance(dict(model.named_modules())[gradcam_target_layer(model)], torch.nn.ReLU)


def test_alexnet_is_torchvisions_and_reads_packages_of_the_hand_written_one():
    """Old-layout weights (features.conv1 ... classifier.fc3) load, and the forward pass equals the paper's
    layer sequence written out with torch.nn.functional."""
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(3)
    model = AlexNet(in_chans=2, num_classes=3).eval()
    assert isinstance(model, torchvision.models.AlexNet) and model.features[0].in_channels == 2
    old_names = {"features.0": "features.conv1", "features.3": "features.conv2", "features.6": "features.conv3",
                 "features.8": "features.conv4", "features.10": "features.conv5", "classifier.1": "classifier.fc1",
                 "classifier.4": "classifier.fc2", "classifier.6": "classifier.fc3"}
    w = {k: torch.randn_like(v) * 0.05 for k, v in model.state_dict().items()}
    old = {f"{old_names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in w.items()}
    fresh = AlexNet(in_chans=2, num_classes=3).eval()
    fresh.load_state_dict(old)
    x = torch.rand(2, 2, 192, 192)
    h = F.max_pool2d(F.relu(F.conv2d(x, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2)), 3, 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, w["features.3.weight"], w["features.3.bias"], padding=2)), 3, 2)
    for i in (6, 8, 10):
        h = F.relu(F.conv2d(h, w[f"features.{i}.weight"], w[f"features.{i}.bias"], padding=1))
    h = torch.flatten(F.adaptive_avg_pool2d(F.max_pool2d(h, 3, 2), (6, 6)), 1)
    h = F.relu(F.linear(F.relu(F.linear(h, w["classifier.1.weight"], w["classifier.1.bias"])),
                        w["classifier.4.weight"], w["classifier.4.bias"]))
    expected = F.linear(h, w["classifier.6.weight"], w["classifier.6.bias"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# local pretrained weights (3-channel 224-px checkpoint -> 2-channel 192-px model)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    import timm

    torch.manual_seed(123)
    src = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3, num_classes=7
    )
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    folder = tmp_path_factory.mktemp("weights")
    save_file(sd, str(folder / "src.safetensors"))
    torch.save(sd, folder / "src.pth")
    return folder, sd


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("modalities", [["t1", "t2"], ["t1"]])
def test_pretrained_local_file_adapts_channels_and_pos_embed(source_checkpoint, fmt, modalities, no_network):
    from timm.layers import resample_abs_pos_embed

    folder, sd = source_checkpoint
    model = build_model(dict(TINY, modalities=modalities, pretrained=str(folder / f"src.{fmt}")))
    w = sd["patch_embed.proj.weight"]  # (48, 3, 16, 16)
    if len(modalities) == 2:
        expected = w[:, :2] * (3 / 2)  # timm adapt_input_conv: repeat RGB, keep 2, scale 3/2
    else:
        expected = w.sum(dim=1, keepdim=True)  # one channel: sum RGB
    assert model.patch_embed.proj.weight.shape == (48, len(modalities), 16, 16)
    assert torch.allclose(model.patch_embed.proj.weight, expected, atol=1e-6)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 48)
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[12, 12], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, want, atol=1e-6)
    assert torch.equal(model.pos_embed[0, 0], sd["pos_embed"][0, 0])  # class-token position kept
    assert torch.equal(model.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    assert torch.equal(model.cls_token, sd["cls_token"])
    assert model.head.weight.shape == (3, 48)  # new head for 3 classes


def to_google_npz(sd: dict, heads: int, path) -> None:
    """Write a timm ViT state dict in the original Google/JAX .npz layout (as ViT-B_16.npz)."""
    import numpy as np

    d = sd["cls_token"].shape[-1]
    hd = d // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = g + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].chunk(3), sd[b + "attn.qkv.bias"].chunk(3)
        for name, wq, bq in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w[mha + name + "/kernel"] = wq.T.reshape(d, heads, hd)
            w[mha + name + "/bias"] = bq.reshape(heads, hd)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, heads, hd).permute(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, tn in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[g + ln + "/scale"], w[g + ln + "/bias"] = sd[b + tn + ".weight"], sd[b + tn + ".bias"]
        for r in range(2):
            w[g + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[g + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        i += 1
    np.savez(path, **{k: v.detach().contiguous().numpy() for k, v in w.items()})


def test_pretrained_google_npz(source_checkpoint, no_network):
    from timm.layers import resample_abs_pos_embed

    folder, sd = source_checkpoint
    path = folder / "ViT-tiny.npz"
    to_google_npz(sd, heads=3, path=path)
    model = build_model(dict(TINY, pretrained=str(path)))
    assert torch.allclose(
        model.patch_embed.proj.weight, sd["patch_embed.proj.weight"][:, :2] * 1.5, atol=1e-6
    )
    # timm's .npz loader resamples position embeddings bilinearly (the reference code: linear zoom)
    want = resample_abs_pos_embed(
        sd["pos_embed"], new_size=[12, 12], num_prefix_tokens=1, interpolation="bilinear", antialias=False
    )
    assert torch.allclose(model.pos_embed, want, atol=1e-6)
    for key in (
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "norm.weight",
    ):
        assert torch.allclose(model.state_dict()[key], sd[key], atol=1e-6), key
    assert model.head.weight.shape == (3, 48)
    with pytest.raises(IPMNError, match="cannot load pretrained weights"):
        build_model(dict(TINY, depth=3, pretrained=str(path)))  # block 2 is not in the file


def test_pretrained_late_fusion_uses_single_channel_rule(source_checkpoint, no_network):
    folder, sd = source_checkpoint
    model = build_model(dict(TINY, fusion="late", pretrained=str(folder / "src.safetensors")))
    for branch in model.branches.values():
        assert torch.allclose(
            branch.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True), atol=1e-6
        )


def test_pretrained_reduced_depth_takes_first_blocks(source_checkpoint, no_network):
    folder, sd = source_checkpoint
    model = build_model(dict(TINY, depth=1, pretrained=str(folder / "src.safetensors")))
    assert len(model.blocks) == 1
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_pretrained_refusals(source_checkpoint, tmp_path, no_network):
    folder, sd = source_checkpoint
    with pytest.raises(IPMNError, match="not found"):
        build_model(dict(TINY, pretrained=str(tmp_path / "nope.safetensors")))
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(IPMNError, match="unsupported type"):
        build_model(dict(TINY, pretrained=str(tmp_path / "w.ckpt")))
    # depth 3 asks for a block the checkpoint does not have
    with pytest.raises(IPMNError, match=r"missing keys blocks\.2\."):
        build_model(dict(TINY, depth=3, pretrained=str(folder / "src.safetensors")))
    # wrong width
    with pytest.raises(IPMNError, match="cannot load pretrained weights"):
        build_model(dict(TINY, embed_dim=96, pretrained=str(folder / "src.safetensors")))
    # a pickle that is not a plain state dict is never unpickled
    torch.save({"model": sd, "note": _Opaque()}, tmp_path / "evil.pth")
    with pytest.raises(IPMNError, match="only tensors"):
        build_model(dict(TINY, pretrained=str(tmp_path / "evil.pth")))
    # a state dict of another architecture
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(IPMNError, match="not a timm"):
        build_model(dict(TINY, pretrained=str(tmp_path / "resnet.safetensors")))


class _Opaque:
    pass


def test_pretrained_wrapped_checkpoints_are_unwrapped_as_timm_does(source_checkpoint, tmp_path, no_network):
    """EMA entry preferred over 'model', DDP 'module.' prefixes dropped (timm.models.load_state_dict)."""
    folder, sd = source_checkpoint
    ema = {f"module.{k}": v + 1.0 for k, v in sd.items()}
    torch.save({"model": sd, "state_dict_ema": ema, "epoch": 3}, tmp_path / "wrapped.pth")
    model = build_model(dict(TINY, pretrained=str(tmp_path / "wrapped.pth")))
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"] + 1.0)


def test_pretrained_cnn_local_file(tmp_path, no_network):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    model = build_model(dict(arch="resnet18", pretrained=str(tmp_path / "r18.safetensors")))
    assert torch.allclose(model.conv1.weight, src.conv1.weight[:, :2] * 1.5, atol=1e-6)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


# --------------------------------------------------------------------------------------------------
# packages
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a non-trivial head
    return model


def _package_config(**extra):
    return dict(
        TINY,
        card="Tiny test model.",
        metrics={"balanced_accuracy": 0.5},
        preprocessing={"zscore": True},
        **extra,
    )


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 2e-2)])
def test_package_round_trip(tmp_path, tiny_model, dtype, atol):
    x = torch.rand(2, 2, 192, 192)
    with torch.no_grad():
        want = tiny_model(x)
    folder = save_package(tmp_path / "pkg", tiny_model, _package_config(weights_source="test"), dtype=dtype)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary folders left behind
    model, config = load_package(folder)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.requires_grad and not p.is_meta for p in model.parameters())
    with torch.no_grad():
        got = model(x)
    if atol == 0.0:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, atol=atol)
    assert config["format"] == "ipmn-model" and config["format_version"] == 1
    assert config["weights_dtype"] == dtype
    assert set(config["software"]) == {"ipmn", "torch", "timm"}
    assert config["card"] == "Tiny test model." and config["metrics"] == {"balanced_accuracy": 0.5}
    assert config["weights_source"] == "test" and config["preprocessing"] == {"zscore": True}
    assert config["class_names"] == list(CLASS_NAMES) and config["img_size"] == 192
    size32 = 0 if dtype == "float32" else (folder / "model.safetensors").stat().st_size
    if size32:
        n_params = sum(p.numel() for p in tiny_model.parameters())
        assert size32 < n_params * 2 + 50_000  # stored as 2-byte floats


def test_same_weights_give_the_same_weight_file_bytes(tmp_path, tiny_model):
    """A retrained model that reproduces every tensor must reproduce the file's SHA-256 too: the safetensors
    header may not depend on a hash map's per-process order (two metadata keys did)."""
    import hashlib

    digests = set()
    for i in range(8):
        folder = save_package(tmp_path / f"pkg{i}", tiny_model, _package_config(), dtype="float16")
        digests.add(hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_package_late_fusion_and_cnn_round_trip(tmp_path):
    for cfg in (dict(TINY, fusion="late"), dict(arch="resnet18", modalities=["t2"])):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        x = torch.rand(2, len(normalize_config(cfg)["modalities"]), 192, 192)
        folder = save_package(tmp_path / cfg["arch"], model, cfg)
        loaded, _ = load_package(folder)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_package_replace_is_atomic_and_never_clobbers_other_folders(tmp_path, tiny_model):
    folder = save_package(tmp_path / "pkg", tiny_model, _package_config(version="a"))
    save_package(folder, tiny_model, _package_config(version="b"))
    assert load_package(folder)[1]["version"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(IPMNError, match="refusing to overwrite"):
        save_package(other, tiny_model, _package_config())
    assert (other / "thesis.txt").read_text() == "precious"
    with pytest.raises(IPMNError, match="dtype"):
        save_package(tmp_path / "x", tiny_model, _package_config(), dtype="int8")
    with pytest.raises(IPMNError, match="does not match its config"):
        save_package(tmp_path / "x", tiny_model, dict(TINY, depth=3))
    with pytest.raises(IPMNError, match="JSON"):
        save_package(tmp_path / "x", tiny_model, _package_config(bad=object()))
    assert not (tmp_path / "x").exists()


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_package_refusals(tmp_path, tiny_model):
    good = save_package(tmp_path / "good", tiny_model, _package_config())

    def copy(name):
        import shutil

        return shutil.copytree(good, tmp_path / name)

    with pytest.raises(IPMNError, match="not found"):
        load_package(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(IPMNError, match="not a model package folder"):
        load_package(tmp_path / "file.txt")

    p = copy("no_config")
    os.remove(p / "config.json")
    with pytest.raises(IPMNError, match="config.json is missing"):
        load_package(p)

    p = copy("bad_json")
    (p / "config.json").write_text('{"format": "ipmn-model",')
    with pytest.raises(IPMNError, match="not valid JSON"):
        load_package(p)

    p = copy("wrong_format")
    _edit_config(p, format="onnx")
    with pytest.raises(IPMNError, match="not an IPMN model config"):
        load_package(p)

    p = copy("future")
    _edit_config(p, format_version=2)
    with pytest.raises(IPMNError, match="unsupported format_version 2"):
        load_package(p)

    p = copy("no_weights")
    os.remove(p / "model.safetensors")
    with pytest.raises(IPMNError, match="model.safetensors is missing"):
        load_package(p)

    p = copy("corrupt")
    (p / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(IPMNError, match="cannot read"):
        load_package(p)

    p = copy("deeper")
    _edit_config(p, depth=3)
    with pytest.raises(IPMNError, match=r"missing keys: blocks\.2\."):
        load_package(p)

    p = copy("shallower")
    _edit_config(p, depth=1)
    with pytest.raises(IPMNError, match=r"unexpected keys: blocks\.1\."):
        load_package(p)

    p = copy("wider")
    _edit_config(p, embed_dim=96)
    with pytest.raises(IPMNError, match=r"shape mismatch: cls_token \(1, 1, 48\) vs model \(1, 1, 96\)"):
        load_package(p)

    p = copy("other_arch")
    _edit_config(p, arch="resnet18", depth=None, embed_dim=None, num_heads=None)
    with pytest.raises(IPMNError, match="do not match architecture 'resnet18'"):
        load_package(p)

    p = copy("bad_model_key")
    _edit_config(p, k=10)
    with pytest.raises(IPMNError, match="perfect square"):
        load_package(p)

    # the good one still loads, and never refetches pretrained weights named in its config
    _edit_config(good, pretrained=str(tmp_path / "gone.safetensors"))
    load_package(good)


def test_hub_weights_without_network_is_a_clear_error(no_network):
    with pytest.raises(IPMNError, match="network access"):
        build_model(dict(TINY, pretrained="hub"))


def test_short_arch_names_resolve_to_timm_names():
    from ipmn.models import normalize_config

    assert normalize_config({"arch": "vit_tiny"})["arch"] == "vit_tiny_patch16_224"
    assert normalize_config({"arch": "mobilenet_v2"})["arch"] == "mobilenetv2_100"
    with pytest.raises(IPMNError, match="unknown arch"):
        normalize_config({"arch": "vit_gigantic_typo"})
