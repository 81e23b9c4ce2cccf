"""Model zoo, model configs and model packages.

A model config is a plain JSON-able dict (see :data:`MODEL_DEFAULTS`); :func:`normalize_config` fills
defaults and validates it, :func:`build_model` turns it into a ``torch.nn.Module``:

* any timm ViT name (``vit_base_patch16_224`` ...), early fusion (one input channel per modality) or
  late fusion (:class:`LateFusionViT`, one single-channel ViT per modality);
* CNN baselines ``densenet121``, ``resnet18``, ``efficientnet_b5``, ``mobilenetv2_100`` (timm) and
  ``alexnet`` (:class:`AlexNet`), early fusion only.

Model packages (folder with ``model.safetensors`` + ``config.json``): :func:`save_package`,
:func:`load_package`. Importing this package does not import timm, monai, sklearn or matplotlib.
"""

from __future__ import annotations

import copy
import difflib
import math

from torch import nn

from .. import CLASS_NAMES
from ..errors import IPMNError
from .cnn import CNN_ARCHS, GRADCAM_TARGET_LAYERS, AlexNet, build_cnn, cnn_arch_of, gradcam_target_layer
from .package import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    load_package,
    model_config_of,
    read_package_config,
    save_package,
)
from .vit import (
    VIT_OVERRIDES,
    LateFusionViT,
    build_vit,
    create_timm_model,
    is_vit,
    is_vit_arch,
    vit_arch_names,
    vit_blocks,
    vit_branches,
)

__all__ = [
    "CNN_ARCHS",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "GRADCAM_TARGET_LAYERS",
    "MODALITIES",
    "MODEL_DEFAULTS",
    "MODEL_KEYS",
    "VIT_OVERRIDES",
    "WEIGHTS_FILE",
    "AlexNet",
    "LateFusionViT",
    "build_model",
    "cnn_arch_of",
    "create_timm_model",
    "gradcam_target_layer",
    "is_vit",
    "is_vit_arch",
    "load_package",
    "model_config_of",
    "normalize_config",
    "read_package_config",
    "save_package",
    "vit_arch_names",
    "vit_blocks",
    "vit_branches",
]

MODALITIES = ("t1", "t2")

MODEL_DEFAULTS = {
    "arch": "vit_base_patch16_224",
    "modalities": ["t1", "t2"],
    "fusion": "early",
    "k": 9,
    "cell": 64,
    "img_size": None,  # sqrt(k) * cell
    "num_classes": 3,
    "class_names": None,  # CLASS_NAMES when num_classes == 3
    "depth": None,
    "embed_dim": None,
    "num_heads": None,
    "patch_size": None,
    "stem": "patch",  # ViT patch embedding: patch (timm's linear) | conv (ipmn.models.stems, from scratch)
    "reg_tokens": 0,  # ViT register tokens (Darcet 2024); Attention Rollout reads patch tokens only
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "pretrained": None,
}
"""Model-config keys and defaults. ``None`` for depth/embed_dim/num_heads/patch_size = timm's value."""

MODEL_KEYS = tuple(MODEL_DEFAULTS)

ARCH_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit": "vit_base_patch16_224",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenetv2": "mobilenetv2_100",
    "efficientnet-b5": "efficientnet_b5",
    "densenet": "densenet121",
}
"""Short names accepted for ``arch`` (the Slicer trainer and ``ipmn cv --models`` use them)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _arch_error(arch) -> IPMNError:
    choices = list(CNN_ARCHS)
    try:
        choices += vit_arch_names()
    except Exception:  # timm missing: still give a useful message
        pass
    close = difflib.get_close_matches(str(arch), choices, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return IPMNError(
        f"unknown arch '{arch}'{hint}; valid: any timm ViT (e.g. vit_base_patch16_224, vit_small_patch16_224, "
        f"vit_tiny_patch16_224) or one of {', '.join(CNN_ARCHS)}"
    )


def normalize_config(cfg: dict | None = None) -> dict:
    """Return a complete, validated copy of a model config (defaults filled in).

    Raises :class:`IPMNError` naming the problem: unknown key (valid keys listed), unknown arch,
    bad modalities / fusion, ``k`` not a perfect square, ``img_size != sqrt(k) * cell`` ...
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise IPMNError(f"model config must be a mapping of keys to values, got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in MODEL_DEFAULTS]
    if unknown:
        raise IPMNError(
            f"unknown model config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(MODEL_KEYS)}"
        )
    out = copy.deepcopy(MODEL_DEFAULTS)
    out.update(copy.deepcopy(cfg))
    if isinstance(out["arch"], str):
        out["arch"] = ARCH_ALIASES.get(out["arch"].lower(), out["arch"])

    arch = out["arch"]
    if not isinstance(arch, str) or not arch.strip():
        raise _arch_error(arch)
    arch = out["arch"] = arch.strip()
    base = arch.split(".", 1)[0]
    if base in CNN_ARCHS:
        if "." in arch:
            raise IPMNError(f"arch '{arch}': pretrained tags are only supported for timm ViTs, use '{base}'")
        vit = False
    elif is_vit_arch(arch):
        vit = True
    else:
        raise _arch_error(arch)

    mods = out["modalities"]
    if isinstance(mods, tuple):
        mods = list(mods)
    if (
        not isinstance(mods, list)
        or not mods
        or any(m not in MODALITIES for m in mods)
        or len(set(mods)) != len(mods)
    ):
        raise IPMNError(
            f"modalities must be a list drawn from {list(MODALITIES)} without repeats, got {mods!r}"
        )
    out["modalities"] = mods

    if out["fusion"] not in ("early", "late"):
        raise IPMNError(f"fusion must be 'early' or 'late', got {out['fusion']!r}")
    if out["fusion"] == "late":
        if not vit:
            raise IPMNError(f"late fusion is only available for ViTs, not '{arch}'")
        if len(mods) != 2:
            raise IPMNError(f"late fusion needs two modalities (one ViT each), got {mods}")

    k, cell = out["k"], out["cell"]
    if not _is_int(k) or k < 1 or math.isqrt(k) ** 2 != k:
        raise IPMNError(f"k (slices per grid) must be a perfect square (4, 9, 16 ...), got {k!r}")
    if not _is_int(cell) or cell < 1:
        raise IPMNError(f"cell (pixels per slice) must be a positive integer, got {cell!r}")
    expected = math.isqrt(k) * cell
    if out["img_size"] is None:
        out["img_size"] = expected
    elif not _is_int(out["img_size"]) or out["img_size"] != expected:
        raise IPMNError(
            f"img_size must equal sqrt(k) * cell = {expected} (k={k}, cell={cell}), got {out['img_size']!r}"
        )

    nc = out["num_classes"]
    if not _is_int(nc) or nc < 2:
        raise IPMNError(f"num_classes must be an integer >= 2, got {nc!r}")
    names = out["class_names"]
    if names is None:
        if nc != len(CLASS_NAMES):
            raise IPMNError(f"class_names must be given when num_classes is {nc}")
        names = list(CLASS_NAMES)
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list) or len(names) != nc or not all(isinstance(n, str) and n for n in names):
        raise IPMNError(f"class_names must be a list of {nc} non-empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise IPMNError(f"class_names must be distinct, got {names}")
    out["class_names"] = names

    for key in VIT_OVERRIDES:
        v = out[key]
        if v is None:
            continue
        if not vit:
            raise IPMNError(f"{key} is a ViT setting; '{arch}' is a CNN (remove {key})")
        if not _is_int(v) or v < 1:
            raise IPMNError(f"{key} must be a positive integer, got {v!r}")
    if out["patch_size"] is not None and out["img_size"] % out["patch_size"]:
        raise IPMNError(f"img_size {out['img_size']} is not a multiple of patch_size {out['patch_size']}")

    from .stems import STEMS

    if out["stem"] not in STEMS:
        raise IPMNError(f"stem must be one of {', '.join(STEMS)}, got {out['stem']!r}")
    if not _is_int(out["reg_tokens"]) or out["reg_tokens"] < 0:
        raise IPMNError(f"reg_tokens must be an integer >= 0, got {out['reg_tokens']!r}")
    if not vit and (out["stem"] != "patch" or out["reg_tokens"]):
        raise IPMNError(f"stem and reg_tokens are ViT settings; '{arch}' is a CNN (remove them)")

    for key in ("drop_rate", "drop_path_rate"):
        v = out[key]
        if not _is_number(v) or not 0.0 <= v < 1.0:
            raise IPMNError(f"{key} must be a number in [0, 1), got {v!r}")
        out[key] = float(v)

    pre = out["pretrained"]
    if pre in (False, ""):
        pre = None
    if pre is not None and not isinstance(pre, str):
        raise IPMNError(f"pretrained must be null, 'hub' or a weights file path, got {pre!r}")
    out["pretrained"] = pre
    if pre is not None and out["stem"] != "patch":
        raise IPMNError(f"stem '{out['stem']}' is for training from scratch; pretrained weights need stem 'patch'")
    return out


def build_model(cfg: dict) -> nn.Module:
    """Build the (untrained or pretrained) model described by ``cfg`` (normalised first)."""
    cfg = normalize_config(cfg)
    if is_vit_arch(cfg["arch"]):
        return build_vit(cfg)
    return build_cnn(cfg)
