"""Backbones: for 32x32 benchmarks a small CNN and a compact MobileNetV2 (depthwise
separable, as edge users deploy), both trained from scratch; torchvision's ResNet-18/50
(DomainBed's); for edge deployment MobileNetV2 / MobileNetV3-Large (torchvision) and
EfficientNet-Lite0 (``gaqat.efficientnet_lite``, 1280 features).

Every network is a :class:`Network`: a featurizer, dropout and a linear classifier,
in that module order, so ``quantize_model``'s "first conv / last linear" policy finds
the stem convolution and the classifier without per-architecture rules. A torchvision
backbone loses its ImageNet head and keeps its pooled features: 512 (ResNet-18), 2048
(ResNet-50), 1280 (MobileNetV2: the last 1x1 conv's; MobileNetV3-Large: after its
960 -> 1280 linear layer and hardswish, which stay in the featurizer and are quantized).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from gaqat import efficientnet_lite
from gaqat.names import ARCHITECTURES, SCRATCH_ARCHITECTURES


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network (stored in checkpoints and exports)."""

    arch: str = "small_cnn"
    num_classes: int = 10
    weights: str | None = None  # None, "imagenet", or a path to a state_dict file
    freeze_bn: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch: {self.arch!r} is not one of {ARCHITECTURES}")
        if self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes: expected >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout: expected 0 <= dropout < 1, got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class Network(nn.Module):
    """featurizer -> dropout -> classifier; optionally keeps batch norm in eval mode."""

    def __init__(
        self,
        featurizer: nn.Module,
        n_features: int,
        num_classes: int,
        dropout: float = 0.0,
        freeze_bn: bool = False,
    ):
        super().__init__()
        self.featurizer = featurizer
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_features, num_classes)
        self.freeze_bn = freeze_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.featurizer(x)))

    def train(self, mode: bool = True) -> Network:
        """As DomainBed: with ``freeze_bn`` the BN layers keep their ImageNet statistics."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def small_cnn_featurizer(channels: tuple[int, ...] = (32, 64, 128, 128)) -> nn.Sequential:
    """Conv-BN-ReLU blocks (stride 2 after the first), global average pooling."""
    layers: list[nn.Module] = []
    in_ch = 3
    for i, out_ch in enumerate(channels):
        layers += [
            nn.Conv2d(in_ch, out_ch, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


# MobileNetV2's stages (expansion, channels, repeats, stride) adapted to 32x32 inputs:
# the second stage keeps stride 1, so the network downsamples 16x (2x2 last maps) where
# ImageNet's downsamples 32x. CIFAR ports also keep the stem at stride 1; measured here,
# that costs 6x the compute per step (2.3 s against 0.38 s for 96 images on one busy core).
COMPACT_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # ImageNet's: stride 2
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
COMPACT_WIDTH = 0.5


def mobilenet_v2_compact_featurizer() -> tuple[nn.Module, int]:
    """torchvision's MobileNetV2 at width 0.5 for 32x32 images (stages of
    :data:`COMPACT_STAGES`): depthwise layers, which quantize worst, at a size that
    trains from scratch on a CPU. Returns the featurizer and its 1280 features.

    >>> net, n_features = mobilenet_v2_compact_featurizer()
    >>> net(torch.zeros(2, 3, 32, 32)).shape, n_features
    (torch.Size([2, 1280]), 1280)
    """
    stages = [list(stage) for stage in COMPACT_STAGES]
    net = torchvision.models.MobileNetV2(width_mult=COMPACT_WIDTH, inverted_residual_setting=stages)
    return net, _drop_head("mobilenet_v2", net)


# The key prefix of each torchvision backbone's ImageNet classification layer.
_IMAGENET_HEAD = {
    "resnet18": "fc.",
    "resnet50": "fc.",
    "mobilenet_v2": "classifier.1.",
    "mobilenet_v3_large": "classifier.3.",
}


def _drop_head(arch: str, net: nn.Module) -> int:
    """Remove the ImageNet head in place (and torchvision's dropout before it: Network has
    its own); return the number of features left."""
    if arch.startswith("resnet"):
        n_features = net.fc.in_features
        net.fc = nn.Identity()
    elif arch == "mobilenet_v2":
        n_features = net.last_channel
        net.classifier = nn.Identity()
    else:  # mobilenet_v3_large: Linear(960, 1280), Hardswish, Dropout, Linear(1280, 1000)
        n_features = net.classifier[0].out_features
        net.classifier = nn.Sequential(net.classifier[0], net.classifier[1])
    return n_features


def _torchvision_featurizer(arch: str, weights: str | None) -> tuple[nn.Module, int]:
    constructor = getattr(torchvision.models, arch)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            net = constructor(weights=enum)
        except Exception as error:  # torchvision's download: no network, proxy, bad cache...
            raise RuntimeError(
                f"could not download ImageNet weights for {arch} ({error}). Download "
                f"{enum.url} on a machine with internet access and pass the file with "
                f"weights='/path/to/{Path(enum.url).name}' (command line: --weights PATH)."
            ) from error
    else:
        net = constructor(weights=None)
        if weights is not None:
            _load_local_weights(net, Path(weights), arch)
    return net, _drop_head(arch, net)


def _read_weights(path: Path, arch: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for {arch} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"weights file {path}: not a readable torch state_dict ({error})"
        ) from error


def _load_local_weights(net: nn.Module, path: Path, arch: str) -> None:
    state = _read_weights(path, arch)
    head = _IMAGENET_HEAD[arch]
    state = {k: v for k, v in state.items() if not k.startswith(head)}  # ImageNet's classes
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same keys, other shapes: another architecture
        raise ValueError(f"weights file {path} does not fit {arch}: {str(error)[:300]}") from None
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit {arch}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )


def build_model(config: ModelConfig) -> Network:
    if config.arch in SCRATCH_ARCHITECTURES and config.weights is not None:
        raise ValueError(
            f"ModelConfig.weights: {config.arch} has no pretrained weights; "
            f"start QAT from a float checkpoint instead (--init)"
        )
    if config.arch == "small_cnn":
        featurizer, n_features = small_cnn_featurizer(), 128
    elif config.arch == "mobilenet_v2_compact":
        featurizer, n_features = mobilenet_v2_compact_featurizer()
    elif config.arch == "efficientnet_lite0":
        featurizer, n_features = efficientnet_lite.EfficientNetLite0(), efficientnet_lite.FEATURES
        if config.weights is not None:
            path = config.weights
            path = efficientnet_lite.weights_file() if path == "imagenet" else Path(path)
            efficientnet_lite.load_state(featurizer, _read_weights(path, config.arch), path)
    else:
        featurizer, n_features = _torchvision_featurizer(config.arch, config.weights)
    return Network(featurizer, n_features, config.num_classes, config.dropout, config.freeze_bn)
