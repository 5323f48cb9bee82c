"""Encoders shared by the classifiers: a timm backbone and local-file weight loading (never a hub)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from weak2full.errors import InvalidInputError

__all__ = ["create_encoder", "load_encoder_weights", "resolve_encoder_weights"]


def create_encoder(name: str, in_channels: int, weights: str | None, out_indices=None) -> nn.Module:
    """timm ``features_only`` encoder; channels and reductions come from its ``feature_info``.

    ``weights``: None for random init, or a local file (see :func:`load_encoder_weights`).
    """
    try:
        kwargs = {"out_indices": out_indices} if out_indices is not None else {}
        enc = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_channels, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise InvalidInputError(
            f"encoder '{name}' is not a timm model with features_only support: {exc}"
        ) from None
    if weights is not None:
        load_encoder_weights(enc, weights)
    return enc


def resolve_encoder_weights(value: str | None, pretrained: str | Path | None, key: str) -> str | None:
    """The file behind a stage's ``encoder_weights``: None, a path, or ``synthetic`` = ``pretrained``
    (the pretrain stage's output, which dvc.yaml passes to the training stages)."""
    if value != "synthetic":
        return value
    if pretrained is None:
        raise InvalidInputError(
            f"{key} is 'synthetic' but no pretrained weights file was given (the stage's --pretrained, "
            "written by the pretrain stage)."
        )
    return str(pretrained)


def load_encoder_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``module`` (no network), dropping classifier-head keys it lacks.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``. A missing
    file, an unreadable one, or one whose keys or shapes do not fit raises InvalidInputError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"encoder_weights file {path} does not exist (weights are never downloaded).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise InvalidInputError(
            f"encoder_weights file {path} is not a readable torch state dict: {exc}"
        ) from None
    if isinstance(state, dict) and state.get("arch") == "disabled":  # a marker (pretrain stage switched off)
        reason = state.get("reason", "it holds no weights")
        raise InvalidInputError(f"encoder_weights file {path} is a marker: {reason}.")
    # The pretrain stage records what it trained (encoder, in_channels): named when the weights do not fit.
    made = state.get("made_for") if isinstance(state, dict) else None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InvalidInputError(f"encoder_weights file {path} does not hold a state dict.")
    own = module.state_dict()
    head = ("fc", "head", "classifier")  # a full classifier's head, absent from a features_only encoder
    state = {k: v for k, v in state.items() if k in own or k.split(".")[0] not in head}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        held = f" It holds {made}." if made else ""
        raise InvalidInputError(
            f"encoder_weights file {path} does not fit the encoder: {' '.join(first[:3])[:400]}{held}"
        ) from None
