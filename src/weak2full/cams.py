"""Class activation maps: extraction from a trained network, normalisation to 0..1, and the cams stage.

:func:`predict_cams` runs a classifier forward only (``torch.no_grad``, batched) and returns the raw maps
at ``heatmap_size`` plus image probabilities; :func:`run` streams the whole dataset through it in chunks
of ``cams.chunk_size`` slices into ``cams.h5`` (contract in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weak2full.data import model_input
from weak2full.errors import InvalidInputError
from weak2full.h5 import SCHEMA_VERSION, DatasetFile, atomic_output
from weak2full.params import InputParams

__all__ = ["normalise_cam", "predict_cams", "NORMALISATION", "run"]

# How each method's raw map becomes 0..1 (stored in cams.h5 and read by normalise_cam).
NORMALISATION = {"heatmap": "relative", "gap_cam": "max"}


def normalise_cam(cam: np.ndarray, how: str) -> np.ndarray:
    """Map raw class maps (..., S, S) to 0..1 per map, float32.

    ``relative`` (the heatmap network's default): ``(x - median) / (max - median)`` per map, clipped. A
    bleed covers a median 0.4% of a slice, so the median is the map's background level and the peak its
    most confident pixel; thresholds then mean "this share of the way up to the peak", which transfers
    between images. Measured on the default synthetic data (annotated test positives, best threshold
    chosen on val): map Dice 0.28 against 0.20 with ``sigmoid``, whose absolute scale drifts with the
    image logit that balanced sampling shifts. A flat map becomes all zero.
    ``sigmoid``: the per-pixel logit as a probability (absolute scale).
    ``max``: the classic CAM convention for gap_cam, ReLU then divide by the map's maximum (a map with
    no positive value stays all zero).
    """
    cam = np.asarray(cam, dtype=np.float32)
    if how == "relative":
        base = np.median(cam, axis=(-2, -1), keepdims=True)
        span = cam.max(axis=(-2, -1), keepdims=True) - base
        rel = np.divide(cam - base, span, out=np.zeros_like(cam), where=span > 0)
        return np.clip(rel, 0.0, 1.0).astype(np.float32)
    if how == "sigmoid":
        return (1.0 / (1.0 + np.exp(-np.clip(cam, -60.0, 60.0)))).astype(np.float32)
    if how == "max":
        pos = np.maximum(cam, 0.0)
        peak = pos.max(axis=(-2, -1), keepdims=True)
        return np.divide(pos, peak, out=np.zeros_like(pos), where=peak > 0).astype(np.float32)
    raise ValueError(f"unknown CAM normalisation {how!r}; expected 'relative', 'sigmoid' or 'max'")


@torch.no_grad()
def predict_cams(
    model: torch.nn.Module,
    dataset_file: DatasetFile,
    idx,
    input_params: InputParams,
    heatmap_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Raw maps float32 (n, K, S, S), S = ``heatmap_size``, and probabilities float32 (n, K) of rows ``idx``.

    Works for both classifiers: the heatmap network's map is already S x S; gap_cam's stride-32 CAM is
    upsampled bilinearly to S, and so is a PYLON map (stride 4). A slice-context network
    (``model.context_slices`` > 1) gets each slice's window of neighbours. Only images are read from
    ``dataset_file``.
    """
    model.eval().to(device)
    idx = np.asarray(idx, dtype=np.int64)
    context = getattr(model, "context_slices", 1)
    cams, probs = [], []
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        x = model_input(dataset_file.h5["image"], rows, dataset_file.patient, input_params, context)
        x = torch.from_numpy(x).to(device)
        out = model(x)
        cam = out["map"].float()
        if cam.shape[-1] != heatmap_size:
            cam = F.interpolate(cam, size=(heatmap_size, heatmap_size), mode="bilinear", align_corners=False)
        cams.append(cam.cpu().numpy())
        probs.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
    if not cams:
        return np.zeros((0, 0, heatmap_size, heatmap_size), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(cams), np.concatenate(probs)


def run(
    params, model_path: str | Path, dataset_path: str | Path, out: str | Path, method: str | None = None
) -> Path:
    """The cams stage: maps of every slice of ``dataset_path`` by the classifier ``model_path`` into ``out``.

    ``method`` (``heatmap`` or ``gap_cam``; None: whatever the checkpoint holds) must match the
    checkpoint's architecture. Writes ``cam`` float16 (N, K, S, S) chunked per slice and ``prob``
    float32 (N, K), streaming ``cams.chunk_size`` slices at a time.
    """
    from weak2full.models import load_model
    from weak2full.runtime import choose_device

    if method is not None and method not in NORMALISATION:
        raise InvalidInputError(f"--method must be one of {sorted(NORMALISATION)}, got {method!r}.")
    device = choose_device(params.common.device)
    model, ckpt = load_model(model_path, arch=method, device=str(device))
    method = ckpt["arch"]
    if method not in NORMALISATION:
        raise InvalidInputError(
            f"checkpoint {model_path} holds a '{method}' network, not a classifier with maps."
        )
    classes = list(ckpt["classes"])
    if classes != list(params.common.classes):
        raise InvalidInputError(
            f"checkpoint {model_path} was trained for classes {classes}, but common.classes is "
            f"{list(params.common.classes)}; re-run its training stage."
        )
    input_params = InputParams(**ckpt["input"])
    # The map side the classifier was trained and selected at (gap_cam's CAM is upsampled to it).
    size = int(ckpt["heatmap_size"])
    out = Path(out)
    with (
        DatasetFile(dataset_path) as ds,
        atomic_output(out) as tmp,
        h5py.File(tmp, "w", track_order=True) as f,
    ):
        n, k = ds.n, len(classes)
        shape = (n, k, size, size)
        cam = f.create_dataset("cam", shape, np.float16, chunks=(1, k, size, size), track_times=False)
        prob = f.create_dataset("prob", (n, k), np.float32, track_times=False)
        chunk = params.cams.chunk_size
        for start in tqdm(range(0, n, chunk), desc=f"cams ({method})", unit="chunk"):
            rows = np.arange(start, min(n, start + chunk))
            c, p = predict_cams(model, ds, rows, input_params, size, params.cams.batch_size, device)
            cam[start : start + len(rows)] = np.clip(c, -65000, 65000).astype(np.float16)
            prob[start : start + len(rows)] = p
        f.attrs["kind"] = "cams"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["classes"] = json.dumps(classes)
        f.attrs["method"] = method
        f.attrs["heatmap_size"] = size
        f.attrs["stride"] = int(model.stride)
        f.attrs["normalisation"] = NORMALISATION[method]
    return out
