"""The classic CAM baseline: timm encoder -> global average pooling -> linear head.

Its class map is the head applied to the last feature map, ``cam[k] = w_k . f + b_k`` at stride 32
(4x4 at a 128 input), whose spatial mean is exactly the image logit. It exists to show what the
heatmap network's 128x128 map buys; the cams stage upsamples it to ``heatmap_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weak2full.models._encoder import create_encoder

__all__ = ["GapCamNet"]


class GapCamNet(nn.Module):
    """``forward(x)`` with x (B, C, H, W) returns ``{"logits": (B, K), "map": (B, K, H/32, W/32)}``."""

    def __init__(self, encoder: str, in_channels: int, num_classes: int, encoder_weights: str | None = None):
        super().__init__()
        self.encoder = create_encoder(encoder, in_channels, encoder_weights)
        self.stride = self.encoder.feature_info.reduction()[-1]
        self.head = nn.Linear(self.encoder.feature_info.channels()[-1], num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        feat = self.encoder(x)[-1]
        cam = F.conv2d(feat, self.head.weight[:, :, None, None], self.head.bias)
        return {"logits": self.head(feat.mean(dim=(2, 3))), "map": cam}
