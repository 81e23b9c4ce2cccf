"""Convolutional patch embeddings for small-data ViTs (``model.stem: conv`` or ``cnn``).

Xiao et al. 2021 ("Early convolutions help transformers see better") replace the ViT's single
``patch x patch`` stride-``patch`` convolution by a few small stride-2 convolutions followed by a 1x1
projection: same token grid, same transformer, but an inductive bias for local structure that makes
a ViT train from scratch on little data. Here the stem keeps timm's ``PatchEmbed`` interface
(``patch_size``, ``grid_size``, ``num_patches``, ``feat_ratio``), so a timm ``VisionTransformer`` built
with it is still read by Attention Rollout exactly like a plain ViT (one token per ``patch x patch``
area of the input, row-major).

The convolutions are 4x4 with stride 2 and padding 1, so that each output is centred on the pair of
inputs it replaces and every token is centred on its own patch (3x3 stride-2 convolutions with padding 1
would centre token ``j`` on pixel ``16 j``, half a patch off, and shift every rollout map by 8 px).
A token of a 16-px patch sees 46 px of the input, i.e. reaches into the neighbouring tokens; tokens
never straddle grid cells (cells are multiples of the patch), but the border tokens of a cell see a few
pixels of the adjacent cell.

``cnn`` (:func:`_cnn_stem_layer_class`) is a hybrid ViT's backbone instead: ``smallcnn``'s blocks, whose
first two 3x3 convolutions work at full resolution, 2x2 max pools between blocks, and a 2x2 stride-2
projection. Pools and projection tile the patch exactly, so tokens stay centred on their patches; each
token sees ~76 px, several patches around its own.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import STEMS  # noqa: E402 - the config section names the valid stems

"""``patch``: timm's linear patch embedding; ``conv``: :class:`ConvStemEmbed`."""


def _stages(patch_size, what: str) -> int:
    """``log2(patch)``: the number of stride-2 steps of a stem; refuses a non-square or non-power-of-two patch."""
    p = patch_size[0]
    if patch_size[0] != patch_size[1] or p < 2 or 2 ** int(math.log2(p)) != p:
        raise ValueError(f"{what} needs a square power-of-two patch, got {patch_size}")
    return int(math.log2(p))


def _conv_stem_layer_class():
    from timm.layers import PatchEmbed

    class ConvStemEmbed(PatchEmbed):
        """``log2(patch)`` stages of 4x4 stride-2 conv (padding 1) + BatchNorm + ReLU (stage ``i`` of ``n`` has
        ``max(16, embed_dim / 2**(n - i))`` channels, doubling up to ``embed_dim / 2``), then a 1x1 conv
        to ``embed_dim``. Same output as :class:`timm.layers.PatchEmbed`: (B, tokens, embed_dim)."""

        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **kwargs):
            kwargs.pop("bias", None)
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             **kwargs)
            stages = _stages(self.patch_size, "a convolutional stem")
            layers = []
            c_in = in_chans
            for i in range(stages):
                c_out = max(16, embed_dim // 2 ** (stages - i))
                layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.Conv2d(c_in, embed_dim, 1))
            self.proj = nn.Sequential(*layers)

    return ConvStemEmbed


def _cnn_stem_layer_class():
    from timm.layers import PatchEmbed

    class CnnStemEmbed(PatchEmbed):
        """A small CNN as the patch embedding (a hybrid ViT, Dosovitskiy et al. 2021): ``log2(patch)``
        blocks of two 3x3 conv + BatchNorm + ReLU (8, 16, 32, … channels; a 2x2 max pool before every
        block but the first: the blocks of ``smallcnn``), then a 2x2 stride-2 conv to ``embed_dim``.
        The first block works at full resolution, so a 2-px structure (a nodule along x at 2.4 mm pixels)
        reaches the tokens before any downsampling. Same token grid and centring as the other stems."""

        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **kwargs):
            kwargs.pop("bias", None)
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             **kwargs)
            from .cnn import smallcnn_blocks

            n = _stages(self.patch_size, "a CNN stem")
            self.proj = nn.Sequential(*smallcnn_blocks(in_chans, 8, n),
                                      nn.Conv2d(8 * 2 ** (n - 1), embed_dim, 2, stride=2))

    return CnnStemEmbed


def embed_layer_for(stem: str):
    """The ``embed_layer`` to pass to timm's ``VisionTransformer`` for ``stem`` (None = timm's default)."""
    if stem == "patch":
        return None
    if stem == "conv":
        return _conv_stem_layer_class()
    if stem == "cnn":
        return _cnn_stem_layer_class()
    raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
