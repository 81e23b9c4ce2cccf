"""CNN baselines: timm DenseNet121 / ResNet18 / EfficientNet-B5 / MobileNetV2 and an AlexNet.

All take one channel per modality (early fusion) and work at 192 px (any size, in fact: they end with
global or adaptive pooling). Grad-CAM target layers (``GRADCAM_TARGET_LAYERS``) are the last
spatial feature map before global pooling, i.e. the usual Grad-CAM choice:

* ``resnet18`` -> ``layer4`` (512 x 6 x 6 at 192 px, stride 32)
* ``densenet121`` -> ``features.norm5`` (final BatchNorm+ReLU, 1024 x 6 x 6)
* ``efficientnet_b5`` / ``mobilenetv2_100`` -> ``bn2`` (BatchNorm+SiLU/ReLU6 after ``conv_head``, 6 x 6)
* ``alexnet`` -> ``features.relu5`` (after conv5, before the last max-pool, 256 x 11 x 11)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import IPMNError
from .vit import create_timm_model

CNN_ARCHS = ("densenet121", "resnet18", "efficientnet_b5", "mobilenetv2_100", "alexnet")

GRADCAM_TARGET_LAYERS = {
    "resnet18": "layer4",
    "densenet121": "features.norm5",
    "efficientnet_b5": "bn2",
    "mobilenetv2_100": "bn2",
    "alexnet": "features.relu5",
}


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012, single-tower layout), ``in_chans`` inputs, any size >= 64 px.

    At 192 px: conv1 (11x11/4) 47x47 -> pool 23 -> conv2 23 -> pool 11 -> conv3-5 11 -> pool 5 ->
    adaptive average pooling to 6x6 -> 4096 -> 4096 -> classes. ReLUs are not in-place so that
    Grad-CAM's backward hooks work. No pretrained weights exist for this 2-channel variant.
    """

    arch = "alexnet"

    def __init__(self, in_chans: int = 2, num_classes: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = int(num_classes)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_chans, 64, kernel_size=11, stride=4, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(kernel_size=3, stride=2),
                conv2=nn.Conv2d(64, 192, kernel_size=5, padding=2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(kernel_size=3, stride=2),
                conv3=nn.Conv2d(192, 384, kernel_size=3, padding=1),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(384, 256, kernel_size=3, padding=1),
                relu4=nn.ReLU(),
                conv5=nn.Conv2d(256, 256, kernel_size=3, padding=1),
                relu5=nn.ReLU(),
                pool5=nn.MaxPool2d(kernel_size=3, stride=2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            OrderedDict(
                drop1=nn.Dropout(drop_rate),
                fc1=nn.Linear(256 * 6 * 6, 4096),
                relu1=nn.ReLU(),
                drop2=nn.Dropout(drop_rate),
                fc2=nn.Linear(4096, 4096),
                relu2=nn.ReLU(),
                fc3=nn.Linear(4096, self.num_classes),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_cnn(cfg: dict) -> nn.Module:
    """Build the CNN described by a normalised config (early fusion only)."""
    arch = cfg["arch"]
    in_chans = len(cfg["modalities"])
    if arch == "alexnet":
        if cfg["pretrained"] not in (None, False, ""):
            raise IPMNError("no pretrained weights exist for the 2-channel alexnet; set pretrained to null")
        return AlexNet(in_chans=in_chans, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    kwargs = dict(in_chans=in_chans, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    if cfg["drop_path_rate"]:
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return create_timm_model(arch, cfg["pretrained"], **kwargs)


def cnn_arch_of(model: nn.Module) -> str | None:
    """The zoo name of a CNN built here (timm's ``pretrained_cfg['architecture']``), else None."""
    if isinstance(model, AlexNet):
        return "alexnet"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    return str(arch).split(".", 1)[0] if arch else None


def gradcam_target_layer(model: nn.Module) -> str:
    """Name of the Grad-CAM target layer for a zoo CNN (see ``GRADCAM_TARGET_LAYERS``)."""
    arch = cnn_arch_of(model)
    if arch not in GRADCAM_TARGET_LAYERS:
        raise IPMNError(
            f"no Grad-CAM target layer known for {arch or type(model).__name__}; "
            f"known: {', '.join(GRADCAM_TARGET_LAYERS)}"
        )
    return GRADCAM_TARGET_LAYERS[arch]
