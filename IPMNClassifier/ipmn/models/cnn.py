"""CNN baselines: timm DenseNet121 / ResNet18 / EfficientNet-B5 / MobileNetV2, torchvision's AlexNet, and
``smallcnn``, a ~74 k-parameter CNN with global max pooling that trains from scratch in minutes on a CPU
(the distillation teacher of the demo ViT, ``train.teacher_arch``).

All take one channel per modality (early fusion) and work at 192 px (any size, in fact: they end with
global or adaptive pooling). Grad-CAM target layers (``GRADCAM_TARGET_LAYERS``) are the last
spatial feature map before global pooling, i.e. the usual Grad-CAM choice:

* ``resnet18`` -> ``layer4`` (512 x 6 x 6 at 192 px, stride 32)
* ``densenet121`` -> ``features.norm5`` (final BatchNorm+ReLU, 1024 x 6 x 6)
* ``efficientnet_b5`` / ``mobilenetv2_100`` -> ``bn2`` (BatchNorm+SiLU/ReLU6 after ``conv_head``, 6 x 6)
* ``alexnet`` -> ``features.11`` (the ReLU after conv5, before the last max-pool, 256 x 11 x 11)
* ``smallcnn`` -> ``features.3`` (the last block, 64 x 24 x 24 at 192 px, stride 8)
"""

from __future__ import annotations

from torch import nn

from ..errors import IPMNError
from .vit import create_timm_model

CNN_ARCHS = ("densenet121", "resnet18", "efficientnet_b5", "mobilenetv2_100", "alexnet", "smallcnn")

GRADCAM_TARGET_LAYERS = {
    "resnet18": "layer4",
    "densenet121": "features.norm5",
    "efficientnet_b5": "bn2",
    "mobilenetv2_100": "bn2",
    "alexnet": "features.11",
    "smallcnn": "features.3",
}


# The layer names of the hand-written AlexNet that packages saved before the switch to torchvision use.
_OLD_ALEXNET_KEYS = {"features.conv1": "features.0", "features.conv2": "features.3", "features.conv3": "features.6",
                     "features.conv4": "features.8", "features.conv5": "features.10", "classifier.fc1": "classifier.1",
                     "classifier.fc2": "classifier.4", "classifier.fc3": "classifier.6"}


def _alexnet_class():
    from torchvision.models import AlexNet as TorchvisionAlexNet

    class AlexNet(TorchvisionAlexNet):
        """torchvision's AlexNet with its first convolution taking ``in_chans`` inputs, any size >= 64 px.

        At 192 px: conv1 (11x11/4) 47x47 -> pool 23 -> conv2 23 -> pool 11 -> conv3-5 11 -> pool 5 ->
        adaptive average pooling to 6x6 -> 4096 -> 4096 -> classes. No pretrained weights exist for this
        2-channel variant; the initialisation (Kaiming for convolutions, N(0, 0.01) for the linear layers)
        is the one the IPMN baselines were trained with.
        """

        arch = "alexnet"

        def __init__(self, in_chans: int = 2, num_classes: int = 3, drop_rate: float = 0.0):
            super().__init__(num_classes=int(num_classes), dropout=float(drop_rate))
            self.num_classes = int(num_classes)
            self.features[0] = nn.Conv2d(in_chans, 64, kernel_size=11, stride=4, padding=2)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                    nn.init.zeros_(m.bias)
            self._register_load_state_dict_pre_hook(_rename_old_alexnet_keys)

    AlexNet.__qualname__ = "AlexNet"
    return AlexNet


def _rename_old_alexnet_keys(state_dict, prefix, *_args):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        layer, _, param = key[len(prefix):].rpartition(".")
        if layer in _OLD_ALEXNET_KEYS:
            state_dict[f"{prefix}{_OLD_ALEXNET_KEYS[layer]}.{param}"] = state_dict.pop(key)


_ALEXNET = None


def _alexnet():
    """The AlexNet class, built on first use: importing torchvision costs seconds of start-up."""
    global _ALEXNET
    if _ALEXNET is None:
        _ALEXNET = _alexnet_class()
    return _ALEXNET


def smallcnn_blocks(in_chans: int, width: int, n_blocks: int) -> list:
    """``smallcnn``'s blocks: two 3x3 conv + BatchNorm + ReLU each, ``width · 2**i`` channels, a 2x2 max pool
    before every block but the first (also the ViT's ``cnn`` stem, :mod:`ipmn.models.stems`)."""
    blocks, c_in = [], in_chans
    for i in range(n_blocks):
        c_out = width * 2**i
        layers = [] if i == 0 else [nn.MaxPool2d(2)]
        for c in (c_in, c_out):
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        blocks.append(nn.Sequential(*layers))
        c_in = c_out
    return blocks


class SmallCNN(nn.Module):
    """Four blocks of two 3x3 convolutions (BatchNorm, ReLU), 2x2 max pooling between blocks, then global
    *max* pooling and a linear layer: 8-16-32-64 channels, ~74 k parameters at 2 channels (few channels
    at full resolution: 2.2x the training speed of the 16-32-64-64 plan, measured in one run; 54 samples/s
    on 2 idle CPU cores at batch 16).

    Global max pooling answers "is the pattern anywhere in the window", which suits a small finding (a
    mural nodule is a few pixels of one cell); its receptive field (~44 px) spans most of a 64-px cell.
    """

    arch = "smallcnn"

    def __init__(self, in_chans: int = 2, num_classes: int = 3, drop_rate: float = 0.0, width: int = 8):
        super().__init__()
        self.num_classes = int(num_classes)
        self.features = nn.Sequential(*smallcnn_blocks(in_chans, width, 4))
        self.drop = nn.Dropout(float(drop_rate))
        self.head = nn.Linear(8 * width, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.drop(self.features(x).amax(dim=(2, 3))))


def __getattr__(name):
    if name == "AlexNet":
        return _alexnet()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_cnn(cfg: dict) -> nn.Module:
    """Build the CNN described by a normalised config (early fusion only)."""
    arch = cfg["arch"]
    in_chans = len(cfg["modalities"])
    if arch == "alexnet":
        if cfg["pretrained"] not in (None, False, ""):
            raise IPMNError("no pretrained weights exist for the 2-channel alexnet; set pretrained to null")
        return _alexnet()(in_chans=in_chans, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    if arch == "smallcnn":
        if cfg["pretrained"] not in (None, False, ""):
            raise IPMNError("no pretrained weights exist for smallcnn; set pretrained to null")
        return SmallCNN(in_chans=in_chans, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    kwargs = dict(in_chans=in_chans, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    if cfg["drop_path_rate"]:
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return create_timm_model(arch, cfg["pretrained"], **kwargs)


def cnn_arch_of(model: nn.Module) -> str | None:
    """The zoo name of a CNN built here (timm's ``pretrained_cfg['architecture']``), else None."""
    if _ALEXNET is not None and isinstance(model, _ALEXNET):
        return "alexnet"
    if isinstance(model, SmallCNN):
        return "smallcnn"
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
