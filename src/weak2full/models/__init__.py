"""Networks of the chain, their factories and checkpoints.

* :func:`create_heatmap` - the heatmap classifier (:class:`HeatmapNet`), from ``train_classifier``;
* :func:`create_gap_cam` - the GAP-CAM baseline (:class:`GapCamNet`), from ``baseline_cam``;
* :func:`create_segmenter` - an smp segmenter, from ``train_segmenter`` / ``train_oracle``.

A checkpoint is a ``torch.save`` dict ``{"arch", "config", "state_dict", "classes"}``: ``config`` holds
the factory's keyword arguments plus the ``input`` section it was trained with, so
:func:`load_model` rebuilds the network without params.yaml. A disabled oracle writes a marker
checkpoint (``arch="disabled"``) so that DVC has its output; loading it says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from weak2full.errors import InvalidInputError
from weak2full.models._encoder import resolve_encoder_weights
from weak2full.models.gap_cam import GapCamNet
from weak2full.models.heatmap import HeatmapNet, MapPooling, heatmap_stride
from weak2full.models.segmenter import create_segmenter, predict_masks
from weak2full.params import BaselineParams, ClassifierParams, SegmenterParams

__all__ = [
    "HeatmapNet",
    "GapCamNet",
    "MapPooling",
    "heatmap_stride",
    "create_heatmap",
    "create_gap_cam",
    "create_segmenter",
    "create_model",
    "model_config",
    "save_checkpoint",
    "save_disabled",
    "load_model",
    "predict_masks",
    "resolve_encoder_weights",
]


def model_config(arch: str, p, in_channels: int, num_classes: int, input_size: int) -> dict:
    """Keyword arguments of the ``arch`` factory from its params section (JSON-able, kept in checkpoints)."""
    if arch == "heatmap":
        return dict(encoder=p.encoder, in_channels=in_channels, num_classes=num_classes,
                    input_size=input_size, heatmap_size=p.heatmap_size,
                    decoder_channels=list(p.decoder_channels), pooling=p.pooling, lse_r=p.lse_r,
                    topk_fraction=p.topk_fraction, deep_supervision=p.deep_supervision,
                    decoder=p.decoder, slice_context=p.slice_context, context_slices=p.context_slices,
                    **({"test_scale": p.test_scale} if p.test_scale != 1.0 else {}),  # old configs stay
                    **({"train_scale": p.train_scale} if p.train_scale != 1.0 else {}),
                    **({"test_flip": True} if p.test_flip else {}))
    if arch == "gap_cam":
        return dict(encoder=p.encoder, in_channels=in_channels, num_classes=num_classes)
    if arch == "segmenter":
        dec = list(p.decoder_channels) if p.decoder_channels is not None else None
        config = dict(arch=p.arch, encoder=p.encoder, in_channels=in_channels, num_classes=num_classes,
                      decoder_channels=dec)
        if p.upsample > 1:  # only then, so configs of earlier checkpoints stay what they were
            config["upsample"] = p.upsample
        return config
    raise ValueError(f"unknown architecture {arch!r}")


def create_model(arch: str, config: dict, encoder_weights: str | None = None) -> nn.Module:
    """Build an architecture from its stored config (weights: random, or a local encoder file)."""
    if arch == "heatmap":
        return HeatmapNet(**config, encoder_weights=encoder_weights)
    if arch == "gap_cam":
        return GapCamNet(**config, encoder_weights=encoder_weights)
    if arch == "segmenter":
        return create_segmenter(**config, encoder_weights=encoder_weights)
    raise ValueError(f"unknown architecture {arch!r}")


def create_heatmap(p: ClassifierParams, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    config = model_config("heatmap", p, in_channels, num_classes, input_size)
    return create_model("heatmap", config, p.encoder_weights)


def create_gap_cam(p: BaselineParams, in_channels: int, num_classes: int) -> nn.Module:
    return create_model("gap_cam", model_config("gap_cam", p, in_channels, num_classes, 0), p.encoder_weights)


def create_segmenter_from(p: SegmenterParams, in_channels: int, num_classes: int) -> nn.Module:
    config = model_config("segmenter", p, in_channels, num_classes, 0)
    return create_model("segmenter", config, p.encoder_weights)


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, config: dict, classes: list[str],
                    **extra) -> dict:
    """The checkpoint dict (also what ``torch.save`` writes to ``path`` when given)."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"arch": arch, "config": config, "state_dict": weights, "classes": list(classes), **extra}
    if path is not None:
        from weak2full.h5 import atomic_output

        with atomic_output(path) as tmp:
            torch.save(ckpt, tmp)
    return ckpt


def save_disabled(path: str | Path, reason: str) -> None:
    """Marker checkpoint for a stage switched off by params (DVC still needs the output)."""
    from weak2full.h5 import atomic_output

    with atomic_output(path) as tmp:
        torch.save({"arch": "disabled", "config": {}, "state_dict": {}, "classes": [], "reason": reason}, tmp)


def load_model(path: str | Path, arch: str | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a network from a checkpoint: returns ``(model in eval mode, checkpoint dict)``.

    ``arch`` (heatmap, gap_cam, segmenter), when given, must match the checkpoint's: a gap_cam file
    passed where the heatmap network is expected is an InvalidInputError naming both.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {path} does not exist (run the stage that trains it first).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInputError(f"checkpoint {path} is not a readable weak2full checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or not {"arch", "config", "state_dict"} <= set(ckpt):
        raise InvalidInputError(
            f"checkpoint {path} is not a weak2full checkpoint (no arch/config/state_dict)."
        )
    if ckpt["arch"] == "disabled":
        reason = ckpt.get("reason", "its stage is disabled")
        raise InvalidInputError(f"checkpoint {path} is a marker: {reason}.")
    if arch is not None and ckpt["arch"] != arch:
        raise InvalidInputError(
            f"checkpoint {path} holds a '{ckpt['arch']}' network, expected a '{arch}' one."
        )
    try:
        model = create_model(ckpt["arch"], ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"checkpoint {path} does not match its own config: {str(exc)[:300]}"
        ) from None
    return model.eval().to(device), ckpt
