"""Class activation maps: extraction from a trained network, normalisation to 0..1, and the cams stage.

:func:`predict_cams` runs a classifier forward only (``torch.no_grad``, batched) and returns the raw maps
at ``heatmap_size`` plus image probabilities; :func:`run` streams the whole dataset through it in chunks
of ``cams.chunk_size`` slices into ``cams.h5`` (contract in docs/ARCHITECTURE.md), with the network made
forward-only by :func:`weak2full.runtime.inference_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weak2full import distributed
from weak2full.brain import intracranial_mask, restrict_to_brain
from weak2full.data import model_input, neighbours, source_stack
from weak2full.errors import InvalidInputError
from weak2full.h5 import SCHEMA_VERSION, DatasetFile, atomic_output
from weak2full.params import InputParams
from weak2full.runtime import inference_model, release_freed_memory

__all__ = [
    "normalise_cam", "predict_cams", "with_slice_context", "average_with_neighbours", "probability_logit",
    "inference_model", "NORMALISATION", "run",
]

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


def with_slice_context(prob: np.ndarray, patient: np.ndarray, slice_index: np.ndarray,
                       weight: float) -> np.ndarray:
    """Image probabilities (n, K) with each slice's logit averaged with its two neighbours', ``weight`` each.

    Rows are one or more patients' slices, sorted by patient and slice (the dataset.h5 contract); a row's
    neighbour is the adjacent row of the same patient one slice away, else the row itself (a stack's
    ends, a missing slice). A bleed spans a median 4.5 slices while the noise and the mimics that fool
    the classifier change from slice to slice, so the neighbours' evidence ranks slices better: on the
    100-patient held-out cohort, weight 0.5 moved the heatmap network's AUROC 0.859 -> 0.873
    (docs/TUNING.md, Session 11). The maps are left as they are. ``weight`` 0 returns ``prob`` unchanged.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if weight == 0 or len(prob) == 0:
        return prob
    logit = probability_logit(prob)
    prev, nxt = neighbours(patient, np.arange(len(prob)), slice_index)
    mean = average_with_neighbours(logit, prev, nxt, weight)
    return (1.0 / (1.0 + np.exp(-mean))).astype(np.float32)


def probability_logit(prob: np.ndarray) -> np.ndarray:
    """The logit of probabilities in float64, clipped to 1e-7 .. 1 - 1e-7 first: a float32 logit would
    saturate the classifier's many probabilities of 1.000 into ties."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def average_with_neighbours(values: np.ndarray, prev: np.ndarray, nxt: np.ndarray,
                            weight: float) -> np.ndarray:
    """Each row of ``values`` (a logit, a map, a probability mask) averaged with the rows ``prev`` and
    ``nxt`` (:func:`weak2full.data.neighbours`), ``weight`` each against 1 for the row itself."""
    return (values + weight * (values[prev] + values[nxt])) / (1.0 + 2.0 * weight)


@torch.no_grad()
def predict_cams(
    model: torch.nn.Module,
    dataset_file: DatasetFile,
    idx,
    input_params: InputParams,
    heatmap_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw maps float32 (n, K, S, S), S = ``heatmap_size``, and probabilities float32 (n, K) of rows ``idx``.

    Works for both classifiers: the heatmap network's map is already S x S; gap_cam's stride-32 CAM is
    upsampled bilinearly to S, and so is a PYLON map (stride 4). A slice-context network
    (``model.context_slices`` > 1) gets each slice's window of neighbours. With
    ``input_params.brain_mask`` the maps outside the intracranial region are set to their background
    level (:func:`weak2full.brain.restrict_to_brain`). Only images are read from ``dataset_file``.
    ``channels_last``: feed the batches in that memory format (for a model from :func:`inference_model`).
    """
    model.eval().to(device)
    idx = np.asarray(idx, dtype=np.int64)
    context = getattr(model, "context_slices", 1)
    cams, probs = [], []
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        x = model_input(dataset_file.h5["image"], rows, dataset_file.patient, input_params, context)
        x = torch.from_numpy(x).to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        cam = out["map"].float()
        if cam.shape[-1] != heatmap_size:
            cam = F.interpolate(cam, size=(heatmap_size, heatmap_size), mode="bilinear", align_corners=False)
        cam = cam.cpu().numpy()
        if input_params.brain_mask:
            hu = source_stack(dataset_file.h5["image"], rows, dataset_file.patient, "windows")[:, 0]
            cam = restrict_to_brain(cam, intracranial_mask(hu))
        cams.append(cam)
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
    float32 (N, K), streaming ``cams.chunk_size`` slices at a time; ``prob`` gets its slice context
    (:func:`with_slice_context`, ``cams.neighbour_weight``) once every slice is in. Under torchrun each
    rank computes a chunk-aligned share of the slices, and rank 0 merges the shares into the same bytes.
    """
    from weak2full.models import load_model
    from weak2full.runtime import choose_device

    if method is not None and method not in NORMALISATION:
        raise InvalidInputError(f"--method must be one of {sorted(NORMALISATION)}, got {method!r}.")
    # Under torchrun the ranks only exchange barriers (gloo), whatever device computes the maps.
    device = distributed.init(choose_device(params.common.device), backend="gloo")
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
    stride = int(model.stride)
    model, channels_last = inference_model(model)
    out = Path(out)
    attrs = {"kind": "cams", "schema_version": SCHEMA_VERSION, "classes": json.dumps(classes),
             "method": method, "heatmap_size": size, "stride": stride,
             "normalisation": NORMALISATION[method], "neighbour_weight": params.cams.neighbour_weight}
    chunk = params.cams.chunk_size
    with DatasetFile(dataset_path) as ds:
        n, k = ds.n, len(classes)
        context = (ds.patient, ds.slice, params.cams.neighbour_weight)

        def predicted(start: int, stop: int):
            """(start, cam float16, prob) per chunk of rows [start, stop), chunks aligned to 0."""
            for a in tqdm(range(start, stop, chunk), desc=f"cams ({method})", unit="chunk",
                          disable=not distributed.is_main()):
                rows = np.arange(a, min(stop, a + chunk))
                c, p = predict_cams(model, ds, rows, input_params, size, params.cams.batch_size, device,
                                    channels_last)
                yield a, np.clip(c, -65000, 65000).astype(np.float16), p
                release_freed_memory()  # between chunks: resident memory stays flat as N grows

        if distributed.world() == 1:
            _write(out, (n, k, size, size), predicted(0, n), attrs, context)
            return out
        # Under torchrun: each rank writes its share to a part file; rank 0 merges them in row order.
        start, stop = distributed.shard(n, chunk)
        if stop > start:
            blocks = ((a - start, c, p) for a, c, p in predicted(start, stop))
            _write(distributed.part_path(out), (stop - start, k, size, size), blocks, {})
    distributed.barrier()
    if distributed.is_main():
        try:
            _write(out, (n, k, size, size), _from_parts(out, n, chunk), attrs, context)
        finally:
            for r in range(distributed.world()):
                distributed.part_path(out, r).unlink(missing_ok=True)
    distributed.barrier()
    return out


def _write(out: Path, shape: tuple, blocks, attrs: dict, context: tuple | None = None) -> None:
    """cams.h5 ``out`` from ``(first row, cam float16, prob)`` blocks, written atomically in that order.

    ``context``: ``(patient, slice_index, weight)`` of every row, to give ``prob`` its slice context once
    all blocks are in (None for a rank's part file). One process and a torchrun merge make the same calls
    in the same order, hence the same bytes.
    """
    n, k, size, _ = shape
    with atomic_output(out) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        cam = f.create_dataset("cam", shape, np.float16, chunks=(1, k, size, size), track_times=False)
        prob = f.create_dataset("prob", (n, k), np.float32, track_times=False)
        for start, c, p in blocks:
            cam[start : start + len(c)] = c
            prob[start : start + len(c)] = p
        if context is not None:
            prob[:] = with_slice_context(prob[:], *context)
        for key, value in attrs.items():
            f.attrs[key] = value


def _from_parts(out: Path, n: int, chunk: int):
    """The blocks of every rank's part file, chunk by chunk in row order (shards are chunk-aligned)."""
    for r, start, stop in distributed.shards(n, chunk):
        if start == stop:
            continue
        with h5py.File(distributed.part_path(out, r), "r") as f:
            for a in range(start, stop, chunk):
                b = min(stop, a + chunk)
                yield a, f["cam"][a - start : b - start], f["prob"][a - start : b - start]
