"""Auxiliary lesion-map loss (``train.lesion_loss``): where the cohort has lesion masks, the network also
learns *where* each lesion label lies, not only the case's grade.

Why: a 5–9 mm mural nodule is a few pixels of one cell of the 3 × 3 grid, and the case label alone does
not say which pixels made it high risk. On the project's phantoms a small CNN trained on the label alone
never found the nodule (held-out nodule-vs-low-risk AUC 0.52 after 14 epochs on 630 cases), and with
this loss on the same cases and epochs it did (0.89); see README, "Demo model".

How, in one place:

* :func:`lesion_grids` — each training case's lesion label volume (cohort column ``lesion``; 0 = none,
  each other integer a lesion label, e.g. the phantoms' 1 cyst, 2 mural nodule, 3 dilated duct) resampled
  nearest-neighbour onto the case's ROI grid, so its windows and augmentations follow the image's.
* :class:`WithLesionHead` — the classifier plus a 1 × 1 convolution on its last spatial features (CNNs:
  the Grad-CAM layer of :data:`ipmn.models.cnn.GRADCAM_TARGET_LAYERS`; ViTs: the final patch tokens on
  their token grid) that names, per feature-map block, the highest lesion label in the block (0 = none:
  number the labels so that the finding that decides the grade has the highest value, as the phantoms'
  nodule inside its cyst does). Training only: the model package holds the classifier alone, so
  inference, Attention Rollout and Grad-CAM are unchanged.
* :func:`lesion_map_loss` — cross-entropy over the blocks of the cases that have a mask, each label
  weighted by its inverse block frequency in the training split's central windows (:func:`label_weights`,
  capped at :data:`MAX_WEIGHT`: a nodule covers ~0.2 % of the blocks). A per-label binary loss with
  positives and negatives balanced per batch learnt the nodule more slowly on the same cases (held-out
  AUC 0.77 against 0.89 after 12 epochs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipmn.errors import IPMNError

MAX_LABELS = 8
"""Largest lesion label value the head predicts (one output per value 0..n)."""
MAX_WEIGHT = 50.0
"""Cap on a label's loss weight (inverse block frequency), so that a rare label does not drown the rest."""


def labels_on_grid(lesion_path, grid) -> np.ndarray:
    """A lesion label volume (any geometry) as uint8 (slices, rows, columns) on ``grid`` (a RoiGrid or
    its dict), nearest neighbour; raises on labels that are not integers 0..MAX_LABELS."""
    import SimpleITK as sitk

    from ipmn.evaluate import labels_on_reference
    from ipmn.grid import RoiGrid

    grid = RoiGrid.from_dict(grid) if isinstance(grid, dict) else grid
    labels = labels_on_reference(lesion_path, grid.reference_image(sitk.sitkUInt8))
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABELS or np.any(labels != np.round(labels))):
        raise IPMNError(f"lesion mask {lesion_path}: train.lesion_loss takes integer labels 0-{MAX_LABELS} "
                        f"(0 = no lesion), found values from {labels.min():g} to {labels.max():g}")
    return labels.astype(np.uint8)


def lesion_grids(cases, grids: dict, k: int) -> list:
    """Per case: its lesion labels on its ROI grid, padded to ``k`` slices as the images are (None when
    the case has no mask). Refuses a cohort where no case has one: the loss would have nothing to learn."""
    from ipmn.grid import pad_slices

    check_masks(cases)
    out = []
    for c in cases:
        if c.lesion is None:
            out.append(None)
            continue
        labels = labels_on_grid(c.lesion, grids[c.case_id].grid)  # the images' grid: the same shape
        out.append(pad_slices(labels[None], k)[0])
    return out


def check_masks(cases) -> None:
    """Refuse, before any preprocessing, a training split in which no case has a lesion mask."""
    if not any(c.lesion is not None for c in cases):
        raise IPMNError(f"train.lesion_loss needs lesion masks, but none of the {len(cases)} training case(s) "
                        "has one in the cohort's 'lesion' column; add the masks, set train.lesion_loss: 0 in "
                        "your config, or use a preset without it (practical, paper)")


def n_labels(lesions: list) -> int:
    """How many label outputs the head needs: the largest label value in the training masks (at least 1)."""
    return max([1] + [int(v.max()) for v in lesions if v is not None and v.size])


def feature_layer(net):
    """(module, kind) whose output the head reads: the ViT's final norm (tokens) or the CNN's Grad-CAM layer."""
    from ipmn.models.cnn import gradcam_target_layer
    from ipmn.models.vit import is_vit

    if is_vit(net):
        if not hasattr(net, "patch_embed"):
            raise IPMNError("train.lesion_loss works with early-fusion models; set it to 0 for model.fusion: late")
        return net.norm, "tokens"
    name = gradcam_target_layer(net)
    return net.get_submodule(name), "map"


def _as_map(out, net, kind: str):
    """The tapped output as (B, C, h, w)."""
    if kind == "map":
        return out
    tokens = out[:, net.num_prefix_tokens:]
    h, w = net.patch_embed.grid_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class WithLesionHead(nn.Module):
    """``net`` + a 1 × 1 convolution on its tapped features; ``forward`` returns (class logits, lesion
    logits (B, labels + 1, h, w)); ``map_size`` is (h, w). State keys ``net.*`` and ``lesion_head.*``
    (checkpoints only)."""

    def __init__(self, net, labels: int, img_size: int, in_chans: int):
        super().__init__()
        self.net = net
        layer, self.kind = feature_layer(net)
        self._tapped = None
        layer.register_forward_hook(self._tap)
        was = net.training
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_chans, img_size, img_size, device=next(net.parameters()).device))
        net.train(was)
        fmap = _as_map(self._tapped, net, self.kind)
        self._tapped = None
        self.map_size = tuple(fmap.shape[-2:])
        self.lesion_head = nn.Conv2d(fmap.shape[1], labels + 1, 1).to(next(net.parameters()).device)

    def _tap(self, _module, _inputs, output):
        self._tapped = output

    def no_weight_decay(self) -> set:
        skip = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else ()
        return {f"net.{n}" for n in skip}

    def forward(self, x):
        logits = self.net(x)
        fmap = _as_map(self._tapped, self.net, self.kind)
        self._tapped = None
        return logits, self.lesion_head(fmap.float())


def block_targets(labels, size):
    """Tiled label windows (B, 1, H, W) → (B, h, w) long: the highest label in each block of the (h, w)
    feature map (adaptive max pooling, so any stride works)."""
    return F.adaptive_max_pool2d(labels.float(), tuple(size))[:, 0].round().long()


def label_weights(lesions: list, k: int, size, n: int):
    """Loss weight of labels 0..n: blocks / ((n + 1) · blocks of the label), over the central windows of
    the training cases that have a mask, capped at :data:`MAX_WEIGHT` (0 for a label that never occurs)."""
    from ipmn.grid import central_start, tile

    counts = torch.zeros(n + 1, dtype=torch.float64)
    for les in lesions:
        if les is None:
            continue
        s = central_start(les.shape[0], k)
        window = torch.from_numpy(np.ascontiguousarray(tile(les[None, s : s + k])))[None]
        counts += torch.bincount(block_targets(window, size).flatten(), minlength=n + 1)[: n + 1].double()
    w = torch.where(counts > 0, counts.sum() / ((n + 1) * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.clamp(max=MAX_WEIGHT).float()


def lesion_map_loss(lesion_logits, labels, has, weight):
    """Weighted cross-entropy of the blocks' highest labels, over the cases that have a mask (``has``);
    0 when none has."""
    keep = has.bool()
    if not keep.any():
        return lesion_logits.sum() * 0.0
    logits = lesion_logits[keep].float()
    return F.cross_entropy(logits, block_targets(labels[keep], logits.shape[-2:]), weight=weight.to(logits.device))
