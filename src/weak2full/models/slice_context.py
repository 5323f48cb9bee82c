"""Slice context: fuse the deepest encoder features of neighbouring slices of one patient.

The idea of the CNN + recurrent hemorrhage detectors (a per-slice ResNet/ResNeXt encoder, then a
bidirectional LSTM/GRU over the slices of the scan; e.g. Burduja et al., "Accurate and efficient
intracranial hemorrhage detection and subtype classification in 3D CT scans with convolutional and long
short-term memory neural networks", Sensors 2020, and several top RSNA 2019 solutions), made light and
kept spatial so the heatmap still localises: the encoder runs on a window of T slices centred on the one
being classified (:func:`weak2full.data.context_rows`: same patient only, edge slices repeated), and at
every position of the deepest feature map (stride 32, 4x4 at a 128 input) a small module reads the T
feature vectors along the slice axis and adds what it learns to the centre slice's vector. The decoder
then runs on the centre slice alone (its skips and the fused deepest map), so the map and its labels stay
per slice.

* ``gru``: a bidirectional GRU over the T vectors (hidden C/4 each way); its output at the centre, projected
  back to C by a 1x1 (zero-initialised, so training starts from the plain per-slice network), is added.
* ``attention``: the centre vector attends over the T vectors (one multi-head attention layer with a
  learned slice-offset embedding); its output, projected the same way, is added.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceContext", "SLICE_CONTEXT_KINDS"]

SLICE_CONTEXT_KINDS = ("gru", "attention")


class SliceContext(nn.Module):
    """(B, T, C, h, w) deepest features of T slices -> (B, C, h, w) fused features of the centre slice."""

    def __init__(self, kind: str, channels: int, slices: int, heads: int = 4):
        super().__init__()
        if kind not in SLICE_CONTEXT_KINDS:
            raise ValueError(f"slice context must be one of {SLICE_CONTEXT_KINDS}, got {kind!r}")
        self.kind, self.slices = kind, slices
        if kind == "gru":
            hidden = max(8, channels // 4)
            self.rnn = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
            out = 2 * hidden
        else:
            heads = heads if channels % heads == 0 else 1
            self.offset = nn.Parameter(torch.zeros(slices, channels))
            self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
            out = channels
        self.proj = nn.Linear(out, channels)
        nn.init.zeros_(self.proj.weight)  # starts as the identity: the centre slice's own features
        nn.init.zeros_(self.proj.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = feats.shape
        seq = feats.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)  # one sequence per position
        centre = t // 2
        if self.kind == "gru":
            fused = self.rnn(seq)[0][:, centre]
        else:
            keys = seq + self.offset[None, :t]
            fused = self.attn(keys[:, centre : centre + 1], keys, keys, need_weights=False)[0][:, 0]
        out = seq[:, centre] + self.proj(fused)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
