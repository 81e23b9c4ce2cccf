"""Explanations: Attention Rollout (ViTs), Grad-CAM (CNNs), deletion curves and cell-wise TTA transforms.

* :func:`attention_rollout` - Abnar & Zuidema (2020): per layer fuse the heads, add the identity
  (residual path), renormalise rows, multiply the layers (``R = A_L ... A_1``) and read the class
  token's row over the patch tokens.
* :class:`AttentionCapture` - switches timm's fused attention off (fused SDPA never materialises the
  attention probabilities) and records each block's softmax attention with a hook on ``attn_drop``.
* :func:`explain` - logits plus one ``[0, 1]`` map per sample at the input resolution: rollout for
  ViTs, Grad-CAM (hooks removed by their handles, a non-inverting min-max normaliser) for CNNs.
* :func:`deletion_curve` - faithfulness check: delete patches by decreasing saliency vs at random.

Test-time flips and turns of the grid (with inverses for the maps) are in :mod:`ipmn.augment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cellmaps import upsample_cells
from .errors import IPMNError
from .models.vit import LateFusionViT, is_vit, vit_blocks, vit_branches

HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("auto", "rollout", "gradcam")

__all__ = [
    "HEAD_FUSIONS",
    "METHODS",
    "AttentionCapture",
    "attention_rollout",
    "deletion_curve",
    "explain",
    "minmax_normalize",
]


# --------------------------------------------------------------------------------------------------
# Attention Rollout
# --------------------------------------------------------------------------------------------------


def attention_rollout(
    attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention Rollout of a list of per-layer attentions ``(B, heads, N, N)`` (token 0 = class token).

    Per layer: fuse heads (``mean``/``max``/``min``); optionally set the lowest ``discard_ratio`` fraction
    of the attentions to patch tokens to 0 (attention *to* the class token, column 0, is never
    discarded); add the identity; renormalise each row to sum 1. Then ``R = A_L ... A_1`` and the result
    is ``R[:, 0, 1:]``, shape ``(B, N - 1)``.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise IPMNError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not isinstance(discard_ratio, (int, float)) or not 0.0 <= float(discard_ratio) < 1.0:
        raise IPMNError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    if len(attentions) == 0:
        raise ValueError("attention_rollout needs at least one attention tensor")
    rollout = None
    shape = None
    for layer, attn in enumerate(attentions):
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attention {layer} must be (B, heads, N, N), got {tuple(attn.shape)}")
        if shape is not None and (attn.shape[0], attn.shape[-1]) != shape:
            raise ValueError(
                f"attention {layer} has shape {tuple(attn.shape)}, previous layers (B, N) = {shape}"
            )
        shape = (attn.shape[0], attn.shape[-1])
        attn = attn.detach().float()
        if head_fusion == "mean":
            fused = attn.mean(dim=1)
        elif head_fusion == "max":
            fused = attn.amax(dim=1)
        else:
            fused = attn.amin(dim=1)
        b, n, _ = fused.shape
        if discard_ratio > 0:
            to_patches = fused[:, :, 1:].reshape(b, -1)
            n_drop = int(to_patches.shape[1] * float(discard_ratio))
            if n_drop:
                idx = to_patches.topk(n_drop, dim=1, largest=False).indices
                to_patches = to_patches.scatter(1, idx, 0.0)
                fused = torch.cat([fused[:, :, :1], to_patches.reshape(b, n, n - 1)], dim=2)
        eye = torch.eye(n, dtype=fused.dtype, device=fused.device)
        a = fused + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:]


class AttentionCapture:
    """Context manager recording the softmax attention of every block of a ViT (or late-fusion ViT).

    On enter: sets ``blk.attn.fused_attn = False`` and hooks ``blk.attn.attn_drop`` (its *input* is the
    softmax, so dropout in training mode does not alter what is recorded). On exit: removes the hooks
    and restores the fused flags. Logits are unchanged (same maths, non-fused kernel)::

        with AttentionCapture(model) as cap:
            logits = model(x)
        attns = cap.attentions  # list of (B, heads, N, N), in vit_blocks(model) order
    """

    def __init__(self, model: nn.Module, detach: bool = True):
        self.model = model
        self.blocks = vit_blocks(model)
        self.detach = detach
        self._store: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._fused: list[tuple[nn.Module, bool]] = []

    def _hook(self, index: int):
        def hook(_module, inputs, _output):
            attn = inputs[0]
            self._store[index] = attn.detach() if self.detach else attn

        return hook

    def __enter__(self) -> AttentionCapture:
        self._store.clear()
        try:
            for i, blk in enumerate(self.blocks):
                attn = getattr(blk, "attn", None)
                if attn is None or not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
                    raise IPMNError(f"block {i} has no timm Attention layer to capture")
                self._fused.append((attn, attn.fused_attn))
                attn.fused_attn = False
                self._handles.append(attn.attn_drop.register_forward_hook(self._hook(i)))
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn, flag in self._fused:
            attn.fused_attn = flag
        self._fused.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def clear(self) -> None:
        self._store.clear()

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Attention of each block from the last forward pass, in block order."""
        if len(self._store) != len(self.blocks):
            raise RuntimeError(
                f"captured {len(self._store)} of {len(self.blocks)} attention maps; run the model inside the context"
            )
        return [self._store[i] for i in range(len(self.blocks))]


# --------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1] over all non-batch dims (constant maps -> 0). Not inverted."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(dim=1).reshape(-1, *([1] * (maps.ndim - 1)))
    hi = flat.amax(dim=1).reshape(-1, *([1] * (maps.ndim - 1)))
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - lo) / safe, torch.zeros_like(maps))


def _expected_in_chans(model: nn.Module) -> int | None:
    if isinstance(model, LateFusionViT):
        return len(model.modalities)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _check_input(model: nn.Module, x) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise IPMNError(f"input must be a float tensor (B, C, H, W), got {shape}")
    chans = _expected_in_chans(model)
    if chans is not None and x.shape[1] != chans:
        raise IPMNError(f"the model takes {chans} input channel(s) (one per modality), got {x.shape[1]}")
    if is_vit(model):
        for branch in vit_branches(model):
            pe = branch.patch_embed
            if not getattr(pe, "dynamic_img_size", False) and pe.img_size is not None:
                if tuple(x.shape[-2:]) != tuple(pe.img_size):
                    raise IPMNError(
                        f"the model takes {tuple(pe.img_size)} px images, got {tuple(x.shape[-2:])}"
                    )


def _class_indices(class_idx, batch: int, num_classes: int) -> list[int] | None:
    if class_idx is None:
        return None
    if torch.is_tensor(class_idx):
        class_idx = class_idx.tolist()
    if isinstance(class_idx, int) and not isinstance(class_idx, bool):
        idx = [class_idx] * batch
    elif isinstance(class_idx, (list, tuple)) and len(class_idx) == batch:
        idx = [int(c) for c in class_idx]
    else:
        raise IPMNError(f"class_idx must be None, an int or one int per sample ({batch}), got {class_idx!r}")
    bad = [c for c in idx if not 0 <= c < num_classes]
    if bad:
        raise IPMNError(f"class_idx {bad[0]} out of range for {num_classes} classes")
    return idx


def _require_class_token_head(model) -> None:
    """Rollout reads the class token's row: it explains the prediction only when the head reads that token."""
    for branch in vit_branches(model):
        pool = getattr(branch, "global_pool", "token")
        if pool != "token" or getattr(branch, "cls_token", None) is None:
            raise IPMNError(
                f"Attention Rollout needs a ViT that classifies from its class token (global_pool='token'); "
                f"this one pools its patch tokens (global_pool={pool!r}), so the class token's attention "
                "would not explain its prediction"
            )


def _rollout_maps(model, x, head_fusion, discard_ratio, k=9):
    _require_class_token_head(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), AttentionCapture(model) as cap:
            logits = model(x)
            attentions = cap.attentions
    finally:
        model.train(was_training)
    with torch.autocast(x.device.type, enabled=False):  # the rollout products in fp32 even under bf16
        return logits.detach(), _rollout_from(model, x, attentions, head_fusion, discard_ratio, k)


def _rollout_from(model, x, attentions, head_fusion, discard_ratio, k=9):
    maps = []
    start = 0
    for branch in vit_branches(model):
        n_blocks = len(branch.blocks)
        r = attention_rollout(attentions[start : start + n_blocks], head_fusion, discard_ratio)
        start += n_blocks
        r = r[:, branch.num_prefix_tokens - 1 :]  # drop register tokens, if any
        gh = x.shape[-2] // branch.patch_embed.patch_size[0]
        gw = x.shape[-1] // branch.patch_embed.patch_size[1]
        if r.shape[1] != gh * gw:
            raise RuntimeError(f"rollout has {r.shape[1]} patch tokens, expected {gh}x{gw}")
        maps.append(r.reshape(-1, 1, gh, gw))
    grid = torch.stack(maps).mean(dim=0)  # late fusion: average of the branches' rollouts
    up = upsample_cells(grid, tuple(x.shape[-2:]), k)  # cell by cell: no bleeding into other slices
    return minmax_normalize(up[:, 0])


def _gradcam_maps(model, x, class_idx, target_layer, k=9):
    """Grad-CAM (Selvaraju et al. 2017) on one target layer, one sample at a time.

    The layer's output is captured by a forward hook that is removed by its handle; the gradient of the
    class logit with respect to it comes from ``torch.autograd.grad`` (no backward hooks, no parameter
    gradients left behind). Weights = spatial mean of the gradient; map = ReLU of the weighted channel
    sum, upsampled to the input cell by cell (:func:`ipmn.cellmaps.upsample_cells`, no bleeding into
    another slice) and min-max scaled per sample.
    """
    from .models.cnn import gradcam_target_layer

    layer_name = target_layer or gradcam_target_layer(model)
    modules = dict(model.named_modules())
    if layer_name not in modules:
        raise IPMNError(f"Grad-CAM target layer '{layer_name}' is not in {type(model).__name__}")
    captured: list[torch.Tensor] = []
    handle = modules[layer_name].register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    logits_all, maps = [], []
    try:
        for i in range(x.shape[0]):
            captured.clear()
            with torch.enable_grad():
                logits = model(x[i : i + 1].detach())
                ci = int(logits.argmax(1)) if class_idx is None else int(class_idx[i])
                (grad,) = torch.autograd.grad(logits[0, ci], captured[0])
            activation = captured[0].detach()
            weights = grad.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation.float()).sum(dim=1, keepdim=True))
            cam = upsample_cells(cam, tuple(x.shape[-2:]), k)
            maps.append(minmax_normalize(cam[:, 0]))
            logits_all.append(logits.detach())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(logits_all, dim=0), torch.cat(maps, dim=0)


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "auto",
    class_idx=None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target_layer: str | None = None,
    k: int = 9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, C)`` and saliency maps ``(B, H, W)`` in [0, 1] (per-sample min-max) for input ``x``.

    ``method="auto"``: Attention Rollout for ViTs (late fusion averages both branches' rollouts;
    the model must classify from its class token), Grad-CAM for CNNs (target layer from
    ``ipmn.models.GRADCAM_TARGET_LAYERS`` unless ``target_layer`` is given). ``x`` tiles ``k`` slices
    (√k × √k cells): the coarse map is upsampled bilinearly *within each cell*
    (:func:`ipmn.cellmaps.upsample_cells`), never across a cell border into another slice. Rollout is
    class-agnostic (``class_idx`` is only checked); Grad-CAM explains ``class_idx`` (int or one per
    sample; default: the predicted class). The model is evaluated in eval mode and left in its mode.
    """
    if method not in METHODS:
        raise IPMNError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_input(model, x)
    vit = is_vit(model)
    if method == "auto":
        method = "rollout" if vit else "gradcam"
    num_classes = getattr(model, "num_classes", None)
    idx = _class_indices(class_idx, x.shape[0], int(num_classes) if num_classes else 10**9)
    if method == "rollout":
        if not vit:
            raise IPMNError("Attention Rollout needs a Vision Transformer; use method='gradcam' for CNNs")
        return _rollout_maps(model, x, head_fusion, discard_ratio, k)
    if vit:
        raise IPMNError("Grad-CAM is provided for CNNs; use method='rollout' for Vision Transformers")
    return _gradcam_maps(model, x, idx, target_layer, k)


# --------------------------------------------------------------------------------------------------
# deletion curve
# --------------------------------------------------------------------------------------------------


def _auc(y: list[float]) -> float:
    """Trapezoid area under ``y`` sampled evenly on [0, 1]."""
    if len(y) < 2:
        return float(y[0]) if y else 0.0
    dx = 1.0 / (len(y) - 1)
    return float(sum((a + b) / 2.0 * dx for a, b in zip(y[:-1], y[1:], strict=True)))


@torch.no_grad()
def deletion_curve(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    class_idx: int,
    patch: int = 16,
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Deletion curves (Petsiuk et al. 2018) for one input ``x (1, C, H, W)``.

    The image is cut into ``patch x patch`` squares; they are deleted (set to 0, the background value
    after 0-1 scaling, in every channel) in order of decreasing mean ``saliency`` and, for comparison,
    in a random order (``seed``). After each of ``steps`` equal steps the softmax probability of
    ``class_idx`` is recorded. A faithful map makes the probability drop early: ``auc_saliency`` (trapezoid
    on [0, 1]) below ``auc_random``. Returns ``auc_saliency``, ``auc_random``, ``curve_saliency``,
    ``curve_random`` (lists of ``steps + 1`` probabilities) and ``fractions`` (deleted fraction per point).
    """
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] != 1:
        raise IPMNError(f"deletion_curve takes one image (1, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    h, w = x.shape[-2:]
    saliency = torch.as_tensor(saliency, dtype=torch.float32)
    if saliency.ndim == 3 and saliency.shape[0] == 1:
        saliency = saliency[0]
    if tuple(saliency.shape) != (h, w):
        raise IPMNError(f"saliency must be (H, W) = ({h}, {w}), got {tuple(saliency.shape)}")
    if not isinstance(patch, int) or patch < 1 or h % patch or w % patch:
        raise IPMNError(f"patch must divide the image size {h}x{w}, got {patch!r}")
    if not isinstance(steps, int) or steps < 1:
        raise IPMNError(f"steps must be a positive integer, got {steps!r}")
    gh, gw = h // patch, w // patch
    n = gh * gw
    score = F.avg_pool2d(saliency[None, None].to(x.device), patch)[0, 0].flatten()
    order_sal = torch.argsort(score, descending=True, stable=True)
    gen = torch.Generator().manual_seed(int(seed))
    order_rand = torch.randperm(n, generator=gen).to(x.device)

    def images(order):
        out = []
        for s in range(steps + 1):
            mask = torch.ones(n, device=x.device, dtype=x.dtype)
            mask[order[: round(n * s / steps)]] = 0
            mask = mask.reshape(1, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
            out.append(x * mask)
        return torch.cat(out, dim=0)

    was_training = model.training
    model.eval()
    try:
        probs = []
        batch = torch.cat([images(order_sal), images(order_rand)], dim=0)
        for i in range(0, batch.shape[0], batch_size):
            probs.append(torch.softmax(model(batch[i : i + batch_size]).float(), dim=1)[:, class_idx])
        probs = torch.cat(probs).cpu().tolist()
    finally:
        model.train(was_training)
    curve_sal, curve_rand = probs[: steps + 1], probs[steps + 1 :]
    return {
        "auc_saliency": _auc(curve_sal),
        "auc_random": _auc(curve_rand),
        "curve_saliency": curve_sal,
        "curve_random": curve_rand,
        "fractions": [round(n * s / steps) / n for s in range(steps + 1)],
        "patch": patch,
    }
