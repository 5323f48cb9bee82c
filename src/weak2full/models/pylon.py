"""The PYLON decoder: Pyramid Localization Network (Preechakul, Sriswasdi, Kijsirikul, Chuangsuwanich,
"High resolution weakly supervised localization architectures for medical images", ICASSP 2021,
arXiv 2010.11475; "Improved image classification explainability with high-accuracy heatmaps", iScience
2022; code github.com/cmb-chula/pylon).

PYLON asks what a classifier's decoder needs for accurate maps and answers: a pyramid-attention block on
the deepest features *without* the global-pooling branch of the Pyramid Attention Network it starts from,
then light upsampling modules that add a 1x1-projected encoder skip to the bilinearly upsampled coarser map
(no concatenation, no 3x3 convs), BatchNorm only (no GroupNorm), the map at stride 4, and global max
pooling of that map into the image logit. Each of those choices is one of its ablations; global pooling
branches and GroupNorm made the maps worse there.

:class:`PylonDecoder` builds that from a timm encoder's ``feature_info``. The image-level pooling stays
:class:`weak2full.models.heatmap.MapPooling` (``train_classifier.pooling: max`` is the published choice),
so PYLON and the UNet-style decoder differ in the decoder only.

One departure, forced by small inputs: at a 128x128 input the deepest map is 4x4, and the published
block halves it three times (4 -> 2 -> 1 -> 0). The halvings here use ``ceil_mode`` so they stop at 1x1,
and each level is upsampled to the exact size of the one above (not by a fixed factor of 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PylonDecoder", "PyramidAttention", "PylonUp", "PYLON_STRIDE"]

PYLON_STRIDE = 4  # the map's stride: the published design stops its upsampling modules at 1/4


class _ConvBnRelu(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int):
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def _half(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class PyramidAttention(nn.Module):
    """``mid(x) * attention(x)``: (B, Cin, h, w) -> (B, C, h, w).

    ``mid`` is a 1x1 conv-BN-ReLU. The attention is one channel built coarse to fine: three max-pool
    halvings with 7x7, 5x5, 3x3 conv-BN-ReLU (Cin -> 1 -> 1 -> 1), then back up, adding a 3x3, 5x5, 7x7
    conv-BN-ReLU of each level, and multiplied into ``mid`` at the input's size. No global-pooling branch.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.mid = _ConvBnRelu(cin, cout, 1)
        self.down1 = _ConvBnRelu(cin, 1, 7)
        self.down2 = _ConvBnRelu(1, 1, 5)
        self.down3 = _ConvBnRelu(1, 1, 3)
        self.conv3 = _ConvBnRelu(1, 1, 3)
        self.conv2 = _ConvBnRelu(1, 1, 5)
        self.conv1 = _ConvBnRelu(1, 1, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: the block is tiny (a few cells a side). On an AMD EPYC (Zen 4),
        # after bf16 training the weights of the Cin -> 1 7x7 conv came out NaN in about half the runs of
        # one test (same seed; it depended on earlier work in the process), never in float32 (8 of 8).
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            x1 = self.down1(_half(x))
            x2 = self.down2(_half(x1))
            x3 = self.down3(_half(x2))
            a = _up(self.conv3(x3), x2)
            a = _up(self.conv2(x2) + a, x1)
            a = _up(self.conv1(x1) + a, x)
            return self.mid(x) * a


class PylonUp(nn.Module):
    """``bilinear_up(coarse) + conv1x1_bn_relu(skip)``: the coarser map climbs to the skip's size."""

    def __init__(self, cskip: int, cout: int):
        super().__init__()
        self.proj = _ConvBnRelu(cskip, cout, 1)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return _up(coarse, skip) + self.proj(skip)


class PylonDecoder(nn.Module):
    """Encoder features (fine to coarse, as timm returns them) -> decoder outputs, coarse to fine.

    ``channels``/``reductions``: the encoder's ``feature_info``. Every module has ``width`` channels. The
    outputs are the attention block's (at the deepest stride) and each upsampling module's, the last at
    stride :data:`PYLON_STRIDE` (or the finest encoder stride above it when the encoder has none at 4).
    """

    def __init__(self, channels: list[int], reductions: list[int], width: int):
        super().__init__()
        self.pa = PyramidAttention(channels[-1], width)
        skip = {r: i for i, r in enumerate(reductions[:-1]) if r >= PYLON_STRIDE}
        self._skip_index = [skip[r] for r in sorted(skip, reverse=True)]  # coarse to fine
        self.ups = nn.ModuleList(PylonUp(channels[i], width) for i in self._skip_index)
        self.stride = reductions[self._skip_index[-1]] if self._skip_index else reductions[-1]
        self.out_channels = [width] * (1 + len(self.ups))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        y = self.pa(feats[-1])
        outs = [y]
        for up, i in zip(self.ups, self._skip_index):
            y = up(y, feats[i])
            outs.append(y)
        return outs
