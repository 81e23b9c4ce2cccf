"""Model zoo, model configs and model packages.

A model config is a plain JSON-able dict (the ``model`` section, :class:`ipmn.config.ModelConfig`);
:func:`ipmn.config.normalize_config` fills defaults and validates it, :func:`build_model` turns it into a ``torch.nn.Module``:

* any timm ViT name (``vit_base_patch16_224`` ...), early fusion (one input channel per modality) or
  late fusion (:class:`LateFusionViT`, one single-channel ViT per modality);
* CNN baselines ``densenet121``, ``resnet18``, ``efficientnet_b5``, ``mobilenetv2_100`` (timm) and
  ``alexnet`` (torchvision's AlexNet, :class:`AlexNet`), early fusion only.

Model packages (folder with ``model.safetensors`` + ``config.json``): :func:`save_package`,
:func:`load_package`. Importing this package does not import timm, monai, sklearn or matplotlib.
"""

from __future__ import annotations

from torch import nn

from ..config import MODEL_DEFAULTS, MODEL_KEYS, normalize_config
from ..vocab import MODALITIES
from .cnn import CNN_ARCHS, GRADCAM_TARGET_LAYERS, build_cnn, cnn_arch_of, gradcam_target_layer
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



def __getattr__(name):
    if name == "AlexNet":  # torchvision's, imported on first use (see cnn._alexnet)
        from .cnn import AlexNet

        return AlexNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def build_model(cfg: dict) -> nn.Module:
    """Build the (untrained or pretrained) model described by ``cfg`` (normalised first)."""
    cfg = normalize_config(cfg)
    if is_vit_arch(cfg["arch"]):
        return build_vit(cfg)
    return build_cnn(cfg)
