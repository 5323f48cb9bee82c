"""The heatmap classifier: timm encoder -> UNet-style decoder -> K logit maps -> pooled image logits.

The localisation path has no global average pooling and no GroupNorm (both make maps worse, PYLON): the
decoder climbs back from the deepest feature with skip connections and BatchNorm, and ends in K logit
maps of ``heatmap_size`` (stride 1, 2 or 4 of the input). The image logit *pools* that map (log-sum-exp,
max or top-k mean), so the same per-pixel logits that localise are the ones the label trains.

Optional deep supervision puts a 1x1 head on the two coarser decoder outputs (stride 2s and 4s); their
maps are pooled and trained on the same labels, and a consistency term asks the average-pooled finer map
to match the next coarser one (:func:`weak2full.losses.heatmap_loss`).

``decoder="pylon"`` swaps the UNet-style decoder for PYLON's (:mod:`weak2full.models.pylon`): its map is
at stride 4 whatever ``heatmap_size`` is, and the cams stage upsamples it to ``heatmap_size``.
``slice_context`` ("gru", "attention") takes a window of ``context_slices`` slices, (B, T, C, H, W), and
fuses their deepest features into the centre slice's (:mod:`weak2full.models.slice_context`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from weak2full.errors import InvalidParameterError
from weak2full.models._encoder import create_encoder
from weak2full.models.pylon import PylonDecoder
from weak2full.models.slice_context import SliceContext

__all__ = ["HeatmapNet", "MapPooling", "heatmap_stride"]

AUX_SCALES = 2  # deep supervision heads on this many coarser decoder outputs


def heatmap_stride(input_size: int, heatmap_size: int) -> int:
    """Input side / heatmap side; must be 1, 2 or 4 (error names ``train_classifier.heatmap_size``)."""
    if input_size % heatmap_size or input_size // heatmap_size not in (1, 2, 4):
        raise InvalidParameterError(
            f"The 'train_classifier.heatmap_size' parameter must divide the input side {input_size} with "
            f"stride 1, 2 or 4 (e.g. {input_size}, {input_size // 2} or {input_size // 4}). "
            f"Got {heatmap_size} instead."
        )
    return input_size // heatmap_size


class MapPooling(nn.Module):
    """(B, K, S, S) logit maps -> (B, K) image logits.

    ``lse``: (1/r) log(mean exp(r x)) with per-class learnable sharpness r (starts at ``lse_r``, kept
    positive by a softplus); r -> 0 is the mean, r -> inf the max. Its learnable per-class bias b
    (starts at 0) is added to the *map* by :meth:`shift`, before pooling: LSE(x + b) = LSE(x) + b, so
    the image logit is the same, and the map stays on the image logit's scale (sigmoid(map) > 0.5
    where the pixel alone would make the image positive; the cams stage relies on that).
    ``max``: the largest pixel. ``topk``: mean of the ``topk_fraction`` largest pixels.
    """

    def __init__(self, kind: str, num_classes: int, lse_r: float = 6.0, topk_fraction: float = 0.02):
        super().__init__()
        self.kind = kind
        self.topk_fraction = topk_fraction
        if kind == "lse":
            raw = math.log(math.expm1(lse_r))  # inverse softplus
            self.raw_r = nn.Parameter(torch.full((num_classes,), raw))
            self.bias = nn.Parameter(torch.zeros(num_classes))
        elif kind not in ("max", "topk"):
            raise InvalidParameterError(
                f"The 'train_classifier.pooling' parameter must be lse, max or topk. Got {kind!r} instead."
            )

    def shift(self, maps: torch.Tensor) -> torch.Tensor:
        """Add the per-class bias (``lse`` only) to (B, K, S, S) maps."""
        return maps + self.bias[None, :, None, None] if self.kind == "lse" else maps

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.float().flatten(2)  # (B, K, S*S)
        if self.kind == "max":
            return flat.amax(dim=2)
        if self.kind == "topk":
            k = max(1, int(round(self.topk_fraction * flat.shape[2])))
            return flat.topk(k, dim=2).values.mean(dim=2)
        r = F.softplus(self.raw_r)[None, :, None]
        lse = (torch.logsumexp(r * flat, dim=2, keepdim=True) - math.log(flat.shape[2])) / r
        return lse[..., 0]


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpBlock(nn.Module):
    """Upsample x2, concatenate the skip of that resolution (if the encoder has one), two conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.convs = nn.Sequential(_ConvBN(cin + cskip, cout), _ConvBN(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class HeatmapNet(nn.Module):
    """Heatmap classifier. ``forward(x)`` with x (B, C, H, W) returns a dict:

    * ``map``: (B, K, S, S) logit maps, S = ``heatmap_size`` = H / stride;
    * ``logits``: (B, K) pooled image logits;
    * ``aux_maps`` / ``aux_logits``: coarser maps (stride 2s, 4s) and their pooled logits, fine to
      coarse (empty lists without deep supervision);
    * ``input``: ``x`` itself, the images the maps belong to (the min-max entropy loss masks them).

    With a slice context, x is (B, T, C, H, W), T = ``context_slices``, the centre slice the classified one.
    """

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        num_classes: int,
        input_size: int,
        heatmap_size: int,
        decoder_channels: list[int],
        pooling: str = "lse",
        lse_r: float = 6.0,
        topk_fraction: float = 0.02,
        deep_supervision: bool = True,
        encoder_weights: str | None = None,
        decoder: str = "unet",
        slice_context: str = "none",
        context_slices: int = 1,
        test_scale: float = 1.0,
        train_scale: float = 1.0,
        test_flip: bool = False,
    ):
        super().__init__()
        heatmap_stride(input_size, heatmap_size)  # the size cams writes must fit the input
        self.heatmap_size = heatmap_size
        self.test_scale, self.train_scale = float(test_scale), float(train_scale)
        self.test_flip = bool(test_flip)
        self.encoder = create_encoder(encoder, in_channels, encoder_weights)
        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        self._reductions = list(reductions)
        self.context_slices = context_slices if slice_context != "none" else 1
        self.context = (SliceContext(slice_context, channels[-1], context_slices)
                        if slice_context != "none" else None)
        self.decoder = decoder
        if decoder == "pylon":
            self.pylon = PylonDecoder(channels, reductions, decoder_channels[0])
            self.stride = self.pylon.stride
            outs_channels = self.pylon.out_channels  # coarse -> fine
        elif decoder == "unet":
            self.stride = heatmap_stride(input_size, heatmap_size)
            deepest = reductions[-1]
            n_blocks = int(round(math.log2(deepest / self.stride)))
            skip_of = {r: c for r, c in zip(reductions[:-1], channels[:-1])}
            self._block_reductions = [deepest // 2 ** (j + 1) for j in range(n_blocks)]
            blocks, cin, outs_channels = [], channels[-1], []
            for j, red in enumerate(self._block_reductions):
                cout = decoder_channels[min(j, len(decoder_channels) - 1)]
                blocks.append(_UpBlock(cin, skip_of.get(red, 0), cout))
                cin = cout
                outs_channels.append(cout)
            self.blocks = nn.ModuleList(blocks)
        else:
            raise InvalidParameterError(
                f"The 'train_classifier.decoder' parameter must be unet or pylon. Got {decoder!r} instead."
            )
        self.head = nn.Conv2d(outs_channels[-1], num_classes, 1)
        n_aux = min(AUX_SCALES, len(outs_channels) - 1) if deep_supervision else 0
        aux_in = outs_channels[::-1][1 : 1 + n_aux]  # fine -> coarse
        self.aux_heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in aux_in)
        self.pool = MapPooling(pooling, num_classes, lse_r, topk_fraction)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of the (centre) slice, the deepest one fused over the slice window."""
        if self.context is None:
            return self.encoder(x)
        if x.dim() != 5 or x.shape[1] != self.context_slices:
            raise ValueError(
                f"a slice-context network takes (B, {self.context_slices}, C, H, W), got {tuple(x.shape)}"
            )
        b, t = x.shape[:2]
        feats = [f.unflatten(0, (b, t)) for f in self.encoder(x.flatten(0, 1))]
        return [f[:, t // 2] for f in feats[:-1]] + [self.context(feats[-1])]

    def forward(self, x: torch.Tensor) -> dict:
        if self.training:
            return self._read(x, self.train_scale)
        out = self._read(x, self.test_scale)
        if self.test_flip:
            # Test-time flip: map and image logits averaged with those of the mirrored slice. On 100
            # held-out synthetic patients, point_acc +0.02 and map Dice +0.02 at 2x, yet no better
            # pseudo-masks (docs/TUNING.md), so train_classifier.test_flip is off by default.
            mirror = self._read(x.flip(-1), self.test_scale)
            out["map"] = 0.5 * (out["map"] + mirror["map"].flip(-1))
            out["logits"] = 0.5 * (out["logits"] + mirror["logits"])
        return out

    def _read(self, x: torch.Tensor, scale: float) -> dict:
        if scale == 1.0:
            return self._forward(x)
        # The network reads the slice enlarged `scale` times (bilinear) and its map is averaged back to
        # the plain map's size: a small bleed then covers more of the encoder's cells. Measured on 100
        # held-out synthetic patients, a network trained at 128x128 and read at 2x reaches point_acc
        # 0.73 against 0.60 at 1x (docs/TUNING.md). The image logits pool the enlarged map; the
        # deep-supervision maps stay at their enlarged sizes.
        h, w = x.shape[-2:]
        big = F.interpolate(x.flatten(0, -4), scale_factor=scale, mode="bilinear", align_corners=False)
        out = self._forward(big.unflatten(0, x.shape[:-3]))
        out["map"] = F.interpolate(out["map"], size=(h // self.stride, w // self.stride), mode="area")
        out["input"] = x
        return out

    def _forward(self, x: torch.Tensor) -> dict:
        feats = self._features(x)
        h, w = x.shape[-2:]
        if self.decoder == "pylon":
            outs = self.pylon(feats)
        else:
            by_red = {r: f for r, f in zip(self._reductions[:-1], feats[:-1])}
            y, outs = feats[-1], []
            for block, red in zip(self.blocks, self._block_reductions):
                y = block(y, by_red.get(red), (h // red, w // red))
                outs.append(y)
        maps = self.pool.shift(self.head(outs[-1]))
        aux_maps = [self.pool.shift(head(o)) for head, o in zip(self.aux_heads, outs[::-1][1:])]
        return {
            "map": maps,
            "logits": self.pool(maps),
            "aux_maps": aux_maps,
            "aux_logits": [self.pool(m) for m in aux_maps],
            "input": x,
        }
