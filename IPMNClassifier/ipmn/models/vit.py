"""Vision Transformers: plain timm ``VisionTransformer`` (early fusion) and :class:`LateFusionViT`.

Early fusion (the paper's main model) is a plain timm ViT whose patch embedding takes one channel per
modality; its state-dict keys are timm's, so a saved model can itself serve as a ``pretrained`` file.
Late fusion (paper, Table II) runs one single-channel ViT per modality; their class tokens (after each
branch's final LayerNorm) are concatenated, normalised by a LayerNorm and classified by a linear head.

Pretrained weights never come from the network unless the user asks for ``"hub"``: a local file goes
through ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` so that timm
adapts the patch embedding to 1 or 2 channels (``adapt_input_conv``) and resamples the position
embeddings to the model's token grid (14x14 -> 12x12 at 192 px).

timm is imported lazily (inside functions) so that ``import ipmn.models`` stays cheap.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from ..config import VIT_OVERRIDES  # the config keys passed straight to timm.create_model
from ..errors import IPMNError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
"""Local pretrained files understood: timm-layout state dicts (safetensors or torch) and Google .npz."""


@functools.lru_cache(maxsize=1)
def _vit_arch_set() -> frozenset:
    import timm

    return frozenset(timm.list_models(module="vision_transformer"))


def vit_arch_names() -> list[str]:
    """All timm model names implemented by ``timm.models.vision_transformer`` (sorted)."""
    return sorted(_vit_arch_set())


def is_vit_arch(arch: str) -> bool:
    """True when ``arch`` (optionally with a ``.tag``) names a timm VisionTransformer."""
    return str(arch).split(".", 1)[0] in _vit_arch_set()


# --------------------------------------------------------------------------------------------------
# pretrained weights
# --------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _checkpoint_keys(path: str) -> set[str]:
    """Names of the tensors in a local state-dict file, read by ``timm.models.load_state_dict``.

    timm unwraps EMA / 'state_dict' / 'model' entries and DDP / compile prefixes as its own loader does;
    ``.pth``/``.pt``/``.bin`` files are read with ``weights_only=True`` (nothing is unpickled).
    """
    from timm.models import load_state_dict

    safetensors = path.lower().endswith(".safetensors")
    try:
        sd = load_state_dict(path, use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # corrupt, not safetensors, or a pickle that needs more than tensors
        if safetensors:
            raise IPMNError(f"cannot read pretrained weights {path}: {_first_line(exc)}") from exc
        raise IPMNError(
            f"cannot read pretrained weights {path} as a plain PyTorch state dict "
            f"(only tensors are accepted, nothing is unpickled): {_first_line(exc)}"
        ) from exc
    if not isinstance(sd, dict):
        raise IPMNError(f"pretrained file {path} does not contain a state dict (a dict of tensors)")
    return set(sd)


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _first_conv_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("first_conv") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _list_some(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def create_timm_model(arch: str, pretrained=None, **kwargs) -> nn.Module:
    """``timm.create_model`` with IPMN's pretrained policy and one-line errors.

    ``pretrained``: ``None`` (random init), ``"hub"`` (timm hub download, needs network) or the path of a
    local file (``.safetensors``, ``.pth``/``.pt``/``.bin`` state dict read with ``weights_only=True``, or
    Google ``.npz``). For a local state dict every weight of the model except the classifier must be in
    the file (extra keys such as blocks beyond a reduced ``depth`` are ignored, as in the reference
    code); otherwise an :class:`IPMNError` lists the missing keys.
    """
    import timm

    if pretrained in (None, False, ""):
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
            raise IPMNError(f"cannot build '{arch}' with {kwargs}: {_first_line(exc)}") from exc
    if pretrained == "hub":
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:
            raise IPMNError(
                f"cannot get pretrained weights for '{arch}' from the timm hub ({_first_line(exc)}); "
                "this needs network access: download them once when online, or give a local weights file"
            ) from exc

    path = os.path.abspath(os.path.expanduser(str(pretrained)))
    if not os.path.isfile(path):
        raise IPMNError(f"pretrained weights file not found: {path}")
    suffix = Path(path).suffix.lower()
    if suffix not in WEIGHT_FILE_SUFFIXES:
        raise IPMNError(
            f"pretrained weights file {path} has an unsupported type '{suffix}' "
            f"(supported: {', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    is_npz = suffix == ".npz"
    file_keys = None if is_npz else _checkpoint_keys(path)
    # custom_load=True routes Google .npz files to the model's own loader (timm's _load_weights, which
    # also adapts channels and resamples position embeddings); state dicts go through timm's generic
    # loader (checkpoint filter -> adapt_input_conv -> classifier dropped when num_classes differs).
    overlay = dict(file=path, custom_load=is_npz)
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:
        raise IPMNError(f"cannot load pretrained weights {path} into '{arch}': {_first_line(exc)}") from exc

    if file_keys is not None:
        first = [f"{n}.weight" for n in _first_conv_names(model)]
        if first and not any(k in file_keys for k in first):
            raise IPMNError(
                f"pretrained file {path} is not a timm '{arch.split('.')[0]}' state dict "
                f"(no '{first[0]}'); give timm-layout weights or a Google .npz"
            )
        heads = tuple(f"{n}." for n in _classifier_names(model))
        required = {
            k
            for k in model.state_dict()
            if not (heads and k.startswith(heads)) and not k.endswith("num_batches_tracked")
        }
        missing = required - file_keys
        if missing:
            raise IPMNError(
                f"pretrained file {path} does not fit '{arch}' with {kwargs}: missing keys {_list_some(missing)}"
            )
    return model


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def _check_rollout_ready(vit: nn.Module, arch: str) -> None:
    """Attention Rollout reads the class token's row and hooks timm's ``Attention`` modules."""
    if getattr(vit, "cls_token", None) is None:
        raise IPMNError(
            f"'{arch}' has no class token, which Attention Rollout needs; use e.g. vit_base_patch16_224"
        )
    if getattr(vit, "global_pool", "token") != "token":
        raise IPMNError(
            f"'{arch}' classifies from pooled patch tokens (global_pool={vit.global_pool!r}), so the class "
            "token's Attention Rollout would not explain its prediction; use a class-token ViT such as "
            "vit_base_patch16_224"
        )
    for blk in getattr(vit, "blocks", []):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
            raise IPMNError(
                f"'{arch}' uses an attention layer IPMN cannot read for Attention Rollout; "
                "use a standard timm ViT such as vit_base_patch16_224"
            )


class LateFusionViT(nn.Module):
    """One single-channel ViT per modality; class tokens concatenated -> LayerNorm -> Linear.

    Input ``(B, len(modalities), H, W)``: channel ``i`` goes to the branch of ``modalities[i]``.
    Parameter names: ``branches.<modality>.*`` (timm names inside), ``norm.*``, ``head.*``.
    """

    def __init__(
        self,
        arch: str,
        modalities=("t1", "t2"),
        num_classes: int = 3,
        pretrained=None,
        drop_rate: float = 0.0,
        **vit_kwargs,
    ):
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = int(num_classes)
        self.branches = nn.ModuleDict(
            {
                m: create_timm_model(
                    arch, pretrained, in_chans=1, num_classes=0, drop_rate=drop_rate, **vit_kwargs
                )
                for m in self.modalities
            }
        )
        for branch in self.branches.values():
            _check_rollout_ready(branch, arch)
        dim = sum(int(b.num_features) for b in self.branches.values())
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, self.num_classes)

    def no_weight_decay(self) -> set:
        """Each branch's own no-decay parameters (position embedding, class and register tokens)."""
        return {f"branches.{m}.{name}" for m, branch in self.branches.items()
                for name in getattr(branch, "no_weight_decay", set)()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.modalities):
            raise IPMNError(
                f"late-fusion model expects input (B, {len(self.modalities)}, H, W), got {tuple(x.shape)}"
            )
        feats = [branch(x[:, i : i + 1]) for i, branch in enumerate(self.branches.values())]
        return torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.norm(self.forward_features(x))))


def build_vit(cfg: dict) -> nn.Module:
    """Build the ViT described by a normalised config (see ``ipmn.models.normalize_config``)."""
    kwargs = dict(img_size=cfg["img_size"], drop_rate=cfg["drop_rate"], drop_path_rate=cfg["drop_path_rate"])
    kwargs.update({k: cfg[k] for k in VIT_OVERRIDES if cfg.get(k) is not None})
    from .stems import embed_layer_for

    if embed_layer_for(cfg.get("stem", "patch")) is not None:
        kwargs["embed_layer"] = embed_layer_for(cfg["stem"])
    if cfg.get("reg_tokens"):
        kwargs["reg_tokens"] = int(cfg["reg_tokens"])
    if cfg["fusion"] == "late":
        return LateFusionViT(
            cfg["arch"], cfg["modalities"], cfg["num_classes"], pretrained=cfg["pretrained"], **kwargs
        )
    model = create_timm_model(
        cfg["arch"],
        cfg["pretrained"],
        in_chans=len(cfg["modalities"]),
        num_classes=cfg["num_classes"],
        **kwargs,
    )
    _check_rollout_ready(model, cfg["arch"])
    return model


def is_vit(model: nn.Module) -> bool:
    """True for a timm VisionTransformer or a :class:`LateFusionViT`."""
    if isinstance(model, LateFusionViT):
        return True
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def vit_branches(model: nn.Module) -> list[nn.Module]:
    """The VisionTransformer(s) inside ``model``: ``[model]`` or one per late-fusion branch."""
    if isinstance(model, LateFusionViT):
        return list(model.branches.values())
    if is_vit(model):
        return [model]
    raise IPMNError(f"{type(model).__name__} is not a Vision Transformer")


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks in execution order (late fusion: all blocks of branch 1, then of branch 2)."""
    return [blk for branch in vit_branches(model) for blk in branch.blocks]
