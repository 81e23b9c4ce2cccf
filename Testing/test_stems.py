"""ViT options for training from scratch: convolutional stem and register tokens."""

from __future__ import annotations

import pytest
import torch

from ipmn.errors import IPMNError
from ipmn.explain import explain
from ipmn.models import build_model, load_package, normalize_config, save_package

TINY = {"arch": "vit_tiny_patch16_224", "depth": 1, "embed_dim": 32, "num_heads": 2}


def test_conv_stem_keeps_the_token_grid_and_is_local():
    torch.manual_seed(0)
    model = build_model({**TINY, "stem": "conv"}).eval()
    assert type(model.patch_embed).__name__ == "ConvStemEmbed"
    assert model.patch_embed.grid_size == (12, 12) and model.patch_embed.patch_size == (16, 16)
    x = torch.rand(1, 2, 192, 192, requires_grad=True)
    tokens = model.patch_embed(x)
    assert tokens.shape == (1, 144, 32)
    # a token depends on its own 16x16 patch and a few pixels around it, not on far-away pixels
    tokens[0, 5 * 12 + 7].sum().backward()
    g = x.grad.abs().sum((0, 1))
    rows, cols = torch.nonzero(g, as_tuple=True)
    assert rows.min() >= 5 * 16 - 16 and rows.max() < 6 * 16 + 16
    assert cols.min() >= 7 * 16 - 16 and cols.max() < 8 * 16 + 16
    # symmetric about the patch centre (7.5 px into the patch): no half-patch shift of the rollout map
    ys, xs = torch.meshgrid(torch.arange(192.0), torch.arange(192.0), indexing="ij")
    assert abs(float((g * ys).sum() / g.sum()) - (5 * 16 + 7.5)) < 1.0
    assert abs(float((g * xs).sum() / g.sum()) - (7 * 16 + 7.5)) < 1.0
    blocks = g.reshape(12, 16, 12, 16).sum((1, 3))  # gradient mass per 16x16 patch
    assert divmod(int(blocks.argmax()), 12) == (5, 7)  # centred on its own patch


def test_cnn_stem_keeps_the_token_grid_and_centres_each_token_on_its_patch():
    # The hybrid stem (smallcnn's blocks, then a 2x2 stride-2 conv): a wider receptive field than the conv
    # stem, but still one token per 16x16 patch, centred on it, so rollout maps land where they belong.
    torch.manual_seed(0)
    model = build_model({**TINY, "stem": "cnn"}).eval()
    assert type(model.patch_embed).__name__ == "CnnStemEmbed"
    assert model.patch_embed.grid_size == (12, 12)
    x = torch.rand(1, 2, 192, 192, requires_grad=True)
    tokens = model.patch_embed(x)
    assert tokens.shape == (1, 144, 32)
    tokens[0, 5 * 12 + 7].sum().backward()
    g = x.grad.abs().sum((0, 1))
    ys, xs = torch.meshgrid(torch.arange(192.0), torch.arange(192.0), indexing="ij")
    assert abs(float((g * ys).sum() / g.sum()) - (5 * 16 + 7.5)) < 1.5
    assert abs(float((g * xs).sum() / g.sum()) - (7 * 16 + 7.5)) < 1.5
    assert divmod(int(g.reshape(12, 16, 12, 16).sum((1, 3)).argmax()), 12) == (5, 7)
    # every pixel of its own patch reaches the token
    assert bool((g[5 * 16 : 6 * 16, 7 * 16 : 8 * 16] > 0).all())


def test_register_tokens_are_left_out_of_the_rollout_map():
    torch.manual_seed(0)
    model = build_model({**TINY, "stem": "conv", "reg_tokens": 4})
    assert model.num_prefix_tokens == 5
    logits, maps = explain(model, torch.rand(2, 2, 192, 192))
    assert logits.shape == (2, 3) and maps.shape == (2, 192, 192)


def test_conv_stem_package_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = {**TINY, "stem": "conv", "reg_tokens": 2}
    model = build_model(cfg).eval()
    x = torch.rand(1, 2, 192, 192)
    folder = save_package(tmp_path / "m", model, cfg)
    loaded, config = load_package(folder)
    assert config["stem"] == "conv" and config["reg_tokens"] == 2
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"stem": "resnet"}, "stem must be one of"),
        ({"reg_tokens": -1}, "reg_tokens"),
        ({"stem": "conv", "pretrained": "hub"}, "from scratch"),
        ({"arch": "resnet18", "stem": "conv", "depth": None, "embed_dim": None, "num_heads": None}, "ViT settings"),
    ],
)
def test_bad_stem_options_are_refused(bad, words):
    with pytest.raises(IPMNError, match=words):
        normalize_config({**TINY, **bad})
