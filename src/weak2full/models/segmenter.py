"""The fully supervised segmenter (segmentation-models-pytorch), and mask prediction for evaluation.

Output: K logit channels, one per class of ``common.classes``, read through a sigmoid (multi-label),
not K+1 softmax channels: ``any`` is the union of the subtypes, so a pixel can be "any" and "subdural"
at once, and a single-class run is then simply one channel. Loss: BCE + soft Dice with ignore label 255
(:func:`weak2full.losses.segmentation_loss`).
"""

from __future__ import annotations

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from weak2full.brain import intracranial_mask
from weak2full.data import build_channels, current_plane, source_stack
from weak2full.errors import InvalidParameterError
from weak2full.models._encoder import load_encoder_weights
from weak2full.params import InputParams
from weak2full.runtime import inference_model

__all__ = ["create_segmenter", "predict_masks"]


def create_segmenter(
    arch: str,
    encoder: str,
    in_channels: int,
    num_classes: int,
    encoder_weights: str | None = None,
    decoder_channels: list[int] | None = None,
    section: str = "train_segmenter",
    upsample: int = 1,
) -> nn.Module:
    """``smp.create_model(arch, encoder, encoder_weights=None, in_channels, classes=K)``.

    ``encoder_weights`` is a local file loaded into the encoder (``tu-`` encoders: into the timm model
    inside it); smp never downloads here. ``decoder_channels`` (None: the arch's default) is passed to
    architectures that take it (Unet, UnetPlusPlus, ...). ``upsample`` > 1: the network works on the
    slice enlarged by that factor and its logits are pooled back (:class:`Upsampled`).
    """
    kwargs = {"decoder_channels": list(decoder_channels)} if decoder_channels is not None else {}
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                 classes=num_classes, **kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"The '{section}.arch'/'{section}.encoder' parameters do not make an smp model "
            f"(arch={arch!r}, encoder={encoder!r}): {exc}"
        ) from None
    if encoder_weights is not None:
        target = model.encoder.model if encoder.startswith("tu-") else model.encoder
        load_encoder_weights(target, encoder_weights)
    return Upsampled(model, upsample) if upsample > 1 else model


class Upsampled(nn.Module):
    """An smp model run on its input enlarged ``factor`` times (bilinear); logits average-pooled back.

    Input and output keep the slice's grid, so losses, crops, masks and metrics are unchanged. Why: at
    128x128 a quarter of the positive slices hold a bleed under 30 pixels, which the encoder's stride-2
    stem and stride-4 first stage blur into one or two cells; the enlarged slice gives the network's
    skips twice the cells per bleed, at four times the compute per pixel.
    """

    def __init__(self, model: nn.Module, factor: int):
        super().__init__()
        self.model, self.factor = model, int(factor)

    @property
    def encoder(self) -> nn.Module:  # the smp model's, as for an unwrapped segmenter
        return self.model.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return F.avg_pool2d(self.model(big), self.factor)


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    dataset_file,
    idx,
    input_params: InputParams,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    flip: bool = False,
) -> np.ndarray:
    """Per-class foreground probabilities float32 (n, K, H, W) for dataset rows ``idx`` (in that order).

    ``dataset_file`` is an open :class:`weak2full.h5.DatasetFile`; only images are read. ``flip``:
    test-time augmentation, the logits of the slice and of its left-right mirror averaged (twice the
    inference; measured in docs/TUNING.md).
    """
    net, channels_last = inference_model(model.to(device))
    idx = np.asarray(idx, dtype=np.int64)
    out = []
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        planes = source_stack(dataset_file.h5["image"], rows, dataset_file.patient, input_params.mode)
        x = torch.from_numpy(build_channels(planes, input_params)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = net(x).float()
        if flip:
            logits = 0.5 * (logits + net(x.flip(-1)).float().flip(-1))
        prob = torch.sigmoid(logits).cpu().numpy()
        if input_params.brain_mask:  # a bleed lies inside the skull (weak2full.brain)
            prob *= intracranial_mask(current_plane(planes, input_params.mode))[:, None]
        out.append(prob)
    if not out:
        return np.zeros((0, 0, dataset_file.height, dataset_file.width), np.float32)
    return np.concatenate(out).astype(np.float32)
