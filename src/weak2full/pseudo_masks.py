"""Class activation maps -> pseudo-masks: labelled classes only, two thresholds, a dense CRF.

Per slice (:func:`make_pseudo_mask`): keep the maps of the classes the image is labelled with (a slice
labelled negative is all background and no CRF runs), upsample them bilinearly to the image, split the
pixels by the normalised map ``m`` (the maximum over the labelled classes) into confident background
(``m < bg``), confident foreground (``m >= fg``) and the band between, and let the CRF refine. The stage
(:func:`run`) streams ``cams.h5`` in chunks through a process pool into ``pseudo_masks.h5``, calibrates
``fg``, ``bg`` and ``crf.compat`` on the annotated val slices (:func:`calibrate`), and scores the raw
and the CRF masks on the annotated val and test slices. It also marks each slice trusted or not
(:func:`trusted_slices`): a labelled slice whose map peaks weakly most often points off the bleed, and the
segmenter does not train on it.

Mask values: 0 background, k for ``classes[k-1]``, 255 ignore (no training signal there).
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, suppress
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from weak2full import distributed
from weak2full.cams import normalise_cam
from weak2full.crf import refine, window_u8
from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.h5 import SCHEMA_VERSION, DatasetFile, atomic_output, open_checked, truth_mask, write_json
from weak2full.metrics import dice_per_slice
from weak2full.params import CRFParams, Params

__all__ = [
    "IGNORE",
    "upsample_bilinear",
    "raw_mask",
    "make_pseudo_mask",
    "map_peaks",
    "trusted_slices",
    "calibrate",
    "run",
]

IGNORE = 255
NORMALISATIONS = ("relative", "sigmoid", "max")


# ------------------------------------------------------------------------------------------ one slice


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of maps (L, S, S') to (L, H, W), float32, pixel centres aligned.

    Same convention as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``;
    written in numpy so that pool workers stay free of torch and the result is bit-stable.
    """
    maps = np.asarray(maps, dtype=np.float32)
    h, w = size
    if maps.shape[-2:] == (h, w):
        return maps.copy()

    def axis_weights(n_in: int, n_out: int):
        x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0.0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)

    y0, y1, wy = axis_weights(maps.shape[-2], h)
    x0, x1, wx = axis_weights(maps.shape[-1], w)
    rows = maps[:, y0, :] * (1.0 - wy)[None, :, None] + maps[:, y1, :] * wy[None, :, None]
    return (rows[:, :, x0] * (1.0 - wx) + rows[:, :, x1] * wx).astype(np.float32)


def _check_thresholds(fg: float, bg: float) -> None:
    if not (0.0 <= bg < fg <= 1.0):
        raise InvalidParameterError(
            f"The 'pseudo_masks.fg' and 'pseudo_masks.bg' parameters must satisfy 0 <= bg < fg <= 1. "
            f"Got fg={fg} and bg={bg} instead."
        )


def _labelled_maps(cam_norm: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """The labelled classes' indices (L,) into ``classes`` and their maps at image size (L, H, W)."""
    cls = np.flatnonzero(np.asarray(label) > 0)
    return cls, upsample_bilinear(np.asarray(cam_norm)[cls], size)


def _raw_from_maps(cls: np.ndarray, maps: np.ndarray, fg: float, bg: float) -> np.ndarray:
    """Thresholded maps: 0 where m < bg, the strongest class where m >= fg, 255 in the band."""
    out = np.full(maps.shape[1:], IGNORE, dtype=np.uint8)
    m = maps.max(axis=0)
    out[m < bg] = 0
    sure = m >= fg
    out[sure] = (cls[maps.argmax(axis=0)] + 1)[sure]
    return out


def _crf_labels(maps: np.ndarray, image_hu: np.ndarray, crf: CRFParams) -> np.ndarray:
    """CRF argmax over [background, labelled classes], int (H, W): 0 background, j = maps[j - 1].

    The unary is the normalised map itself: class j has probability maps[j], background 1 - max_j maps[j]
    (with one class exactly [1 - p, p]), normalised to sum to 1 per pixel.
    """
    prob = np.concatenate([1.0 - maps.max(axis=0, keepdims=True), maps], axis=0)
    prob /= np.maximum(prob.sum(axis=0, keepdims=True), np.float32(1e-12))
    q = refine(prob, window_u8(image_hu, crf.window), crf)
    return q.argmax(axis=0)


def _combine(cls: np.ndarray, maps: np.ndarray, crf_lab: np.ndarray, bg: float) -> np.ndarray:
    """The refined mask: 0 where m < bg, the CRF's class where it calls foreground, else 255."""
    m = maps.max(axis=0)
    out = np.full(m.shape, IGNORE, dtype=np.uint8)
    out[m < bg] = 0
    fg = (crf_lab > 0) & (m >= bg)
    out[fg] = (cls[np.maximum(crf_lab - 1, 0)] + 1)[fg]
    return out


def raw_mask(
    cam_norm: np.ndarray, label: np.ndarray, size: tuple[int, int], fg: float, bg: float
) -> np.ndarray:
    """The thresholded map without CRF, uint8 (H, W) (0 / k / 255); all 0 for a negative slice."""
    _check_thresholds(fg, bg)
    cls, maps = _labelled_maps(cam_norm, label, size)
    if cls.size == 0:
        return np.zeros(size, dtype=np.uint8)
    return _raw_from_maps(cls, maps, fg, bg)


def make_pseudo_mask(
    cam_norm: np.ndarray,
    label: np.ndarray,
    image_hu: np.ndarray,
    fg: float,
    bg: float,
    crf: CRFParams,
) -> np.ndarray:
    """One slice's pseudo-mask.

    Args:
        cam_norm: float (K, S, S) maps normalised to 0..1 (:func:`weak2full.cams.normalise_cam`).
        label: (K,) image-level labels; only the classes labelled 1 may receive pixels.
        image_hu: (H, W) HU slice; the masks are made at its resolution.
        fg, bg: thresholds on the normalised map, 0 <= bg < fg <= 1.
        crf: the CRF's params; ``crf.enabled=False`` returns the raw thresholded map.

    Returns:
        uint8 (H, W): 0 background, k for ``classes[k-1]``, 255 ignore.

    Let ``m`` be, per pixel, the largest upsampled map over the labelled classes. The raw mask is
    0 where ``m < bg``, the strongest class where ``m >= fg``, 255 in the band between. The refined
    mask (the CRF runs on the whole slice over background + labelled classes, the maps as probabilities):

    * ``m < bg`` -> 0: confident background stays background, whatever the CRF says.
    * elsewhere, CRF argmax = class k -> k: the CRF decides foreground, so it may grow a blob into the
      band (to the image edge it follows) and shrink one whose map overshoots its edge.
    * elsewhere, CRF argmax = background -> 255: either a band pixel the CRF did not claim (the map was
      unsure and the CRF added no evidence of foreground) or a pixel the map called confident
      foreground and the CRF did not (map and image disagree). Neither is trained on.

    So with the CRF on, ``bg`` bounds where foreground may appear, the CRF places it, and ``fg`` plays no
    part (it shapes only the raw mask, which is scored beside the CRF mask in metrics). A negative slice
    (no labelled class) is all 0 and runs no CRF.
    """
    _check_thresholds(fg, bg)
    image_hu = np.asarray(image_hu)
    size = image_hu.shape[-2:]
    cls, maps = _labelled_maps(cam_norm, label, size)
    if cls.size == 0:
        return np.zeros(size, dtype=np.uint8)
    if not crf.enabled:
        return _raw_from_maps(cls, maps, fg, bg)
    return _combine(cls, maps, _crf_labels(maps, image_hu, crf), bg)


# ---------------------------------------------------------------------------------- pool plumbing


def _mask_task(settings: tuple, item: tuple) -> np.ndarray:
    """Pool task: raw cams (K, S, S) + label + HU slice -> pseudo-mask (H, W)."""
    normalisation, fg, bg, crf = settings
    cam, label, image = item
    return make_pseudo_mask(normalise_cam(cam, normalisation), label, image, fg, bg, crf)


def _crf_fg_task(settings: tuple, item: tuple) -> np.ndarray:
    """Pool task for calibration: where the CRF calls any labelled class, bool (H, W)."""
    normalisation, crf = settings
    cam, label, image = item
    _, maps = _labelled_maps(normalise_cam(cam, normalisation), label, image.shape)
    return _crf_labels(maps, image, crf) > 0


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: on Linux a worker is killed when the stage process dies (SIGKILL included);
    otherwise workers of a killed stage wait forever on their task queue."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the stage died before prctl took effect
        os._exit(1)


class _Pool:
    """``map`` in order, over a process pool (workers > 1) or inline; the results do not depend on which."""

    def __init__(self, workers: int):
        self.workers = workers
        self._ex = None
        if workers > 1:
            # Linux: fork, so workers start in milliseconds with this module already imported (a fresh
            # import costs seconds). The workers are launched right here, by a first no-op task, so
            # build the pool before opening any HDF5 file: children then inherit no open handle.
            # Elsewhere: spawn.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                           initializer=_exit_with_parent, initargs=(os.getpid(),))
            self._ex.submit(int).result()

    def map(self, fn: Callable, items: Sequence) -> Iterator:
        """Start ``fn`` on every item now; iterate the results in input order."""
        if self._ex is None:
            return map(fn, items)
        return self._ex.map(fn, items, chunksize=max(1, len(items) // (4 * self.workers)))

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)


def _chunks(n: int, size: int, first: int = 0) -> Iterator[tuple[int, int]]:
    for start in range(first, n, size):
        yield start, min(start + size, n)


def _one_ahead(items: Iterable) -> Iterator:
    """Yield each item once the next has been drawn: a pool starts a chunk when it is drawn, so the
    workers compute chunk i+1 while chunk i is written."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(item)
        if len(pending) > 1:
            yield pending.popleft()
    yield from pending


def _finite(cam: np.ndarray, path: Path, first: int | np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(cam).reshape(len(cam), -1).all(axis=1)
    if bad.any():
        where = first + int(np.flatnonzero(bad)[0]) if np.isscalar(first) else int(first[bad][0])
        raise InvalidInputError(
            f"{path}: cam of slice {where} holds NaN or infinite values; re-run the cams stage "
            "(a diverged classifier gives such maps)."
        )
    return cam


# ------------------------------------------------------------------------------------------ trust


def map_peaks(cam_ds, labels: np.ndarray, chunk_size: int, path: Path) -> np.ndarray:
    """Each slice's highest raw map value over the classes it is labelled with, float32 (N,); NaN for a
    slice labelled negative (no map of it counts). Raw: before normalisation, so peaks compare across
    slices (the ``relative`` normalisation sets every peak to 1)."""
    labels = np.asarray(labels).astype(bool)
    peaks = np.full(len(labels), np.nan, dtype=np.float32)
    for start, stop in _chunks(len(labels), chunk_size):
        todo = np.flatnonzero(labels[start:stop].any(axis=1))
        if todo.size == 0:
            continue
        cams = _finite(np.asarray(cam_ds[start:stop], dtype=np.float32), path, start)
        per_class = cams.reshape(cams.shape[0], cams.shape[1], -1).max(axis=2)  # (n, K)
        peaks[start + todo] = np.where(labels[start:stop], per_class, -np.inf)[todo].max(axis=1)
    return peaks


def trusted_slices(peaks: np.ndarray, labels: np.ndarray, train: np.ndarray,
                   fraction: float) -> tuple[np.ndarray, float]:
    """Which slices the segmenter may train on: uint8 (N,) flags and the peak cut-off.

    A slice labelled negative is always trusted (its all-background mask is its label). A labelled slice
    is trusted when its peak (:func:`map_peaks`) reaches the ``fraction`` quantile of the peaks of the
    labelled ``train`` rows, so about that share of them is untrusted; the same cut-off applies to
    every split. Why: the mask of a slice whose map peaks off the bleed marks a false bleed and calls the
    true one background, and those maps peak weakly (docs/TUNING.md). ``fraction`` 0 trusts every slice.
    """
    labelled = np.asarray(labels).astype(bool).any(axis=1)
    pool = peaks[train][labelled[train]]
    cutoff = float(np.quantile(pool, fraction)) if fraction > 0 and pool.size else -np.inf
    with np.errstate(invalid="ignore"):  # NaN peaks are the label-negative slices, trusted anyway
        trusted = ~labelled | (peaks >= cutoff)
    return trusted.astype(np.uint8), cutoff


# ------------------------------------------------------------------------------------------ scoring


class _Scores:
    """Streaming per-slice counts for the metrics of metrics/pseudo_masks.json.

    One entry per (split, variant, class key), class key ``"any"`` (the union of all classes) or a class
    name. Foreground is 1..K; 255 (ignore) counts as background, because it claims nothing. Kept private
    here: the same definitions as DESIGN.md's metric names (dice_pos over slices whose truth has the
    class, fp_slice_rate over those that do not), counted pixel-wise for precision and recall.
    """

    def __init__(self):
        self.rows: dict[tuple[str, str, str], list[tuple[int, int, int, int]]] = collections.defaultdict(list)
        self.ignore: dict[tuple[str, str], list[float]] = collections.defaultdict(list)

    def add(self, split: str, variant: str, pred: np.ndarray, truths: dict[str, np.ndarray], classes) -> None:
        """pred uint8 (H, W) pseudo-mask; truths: class key -> bool (H, W) truth."""
        self.ignore[split, variant].append(float(np.mean(pred == IGNORE)))
        fg = (pred > 0) & (pred != IGNORE)
        for key, truth in truths.items():
            p = fg if key == "any" else pred == classes.index(key) + 1
            tp = int(np.count_nonzero(p & truth))
            self.rows[split, variant, key].append(
                (tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(truth)) - tp, int(truth.any()))
            )

    @staticmethod
    def _summary(rows: list) -> dict:
        if not rows:
            return {"dice_pos": None, "precision": None, "recall": None, "fp_slice_rate": None, "slices": 0}
        tp, fp, fn, pos = (np.asarray(c, dtype=np.int64) for c in zip(*rows))
        pos = pos.astype(bool)
        dice = 2 * tp[pos] / np.maximum(2 * tp[pos] + fp[pos] + fn[pos], 1)
        return {
            "dice_pos": float(dice.mean()) if pos.any() else None,
            "precision": float(tp.sum() / (tp.sum() + fp.sum())) if tp.sum() + fp.sum() else None,
            "recall": float(tp.sum() / (tp.sum() + fn.sum())) if tp.sum() + fn.sum() else None,
            "fp_slice_rate": float(np.mean((tp + fp)[~pos] > 0)) if (~pos).any() else None,
            "slices": int(len(rows)),
        }

    def summary(self, split: str, variant: str, keys: Sequence[str]) -> dict:
        out = self._summary(self.rows[split, variant, "any"])
        ign = self.ignore[split, variant]
        out["ignore_fraction"] = float(np.mean(ign)) if ign else None
        out["per_class"] = {k: self._summary(self.rows[split, variant, k]) for k in keys}
        return out


def _scorable(classes: Sequence[str], mask_classes: Sequence[str]) -> list[str]:
    """Classes whose truth the dataset's masks can give (a single-class `any` mask scores `any` only)."""
    keys = []
    for c in classes:
        try:
            truth_mask(np.zeros((1, 1), np.uint8), mask_classes, c)
        except InvalidInputError:
            continue
        keys.append(c)
    return keys


# -------------------------------------------------------------------------------------- calibration


def calibrate(
    params: Params,
    ds: DatasetFile,
    cam_ds: h5py.Dataset,
    normalisation: str,
    labels: np.ndarray,
    pool: _Pool,
    cams_path: Path,
) -> dict:
    """Search fg, bg and crf.compat on the annotated val slices by dice_pos of the union of classes.

    Only val slices whose truth has foreground are read (dice_pos is defined on them alone); those
    labelled negative score 0 whatever the thresholds, and only the labelled ones run the CRF, once per
    compat value. Every (fg, bg) pair is then a vectorised comparison against that cached CRF output.
    Scored as everywhere: 255 counts as background.

    Returns a dict with ``fg``, ``bg``, ``compat`` (the choice), ``objective`` (``dice_pos_crf`` or
    ``dice_pos_raw``, whichever the output uses), ``val_slices`` and ``table`` (one row per grid point
    with fg > bg: dice_pos_raw, dice_pos_crf, ignore_fraction_raw, ignore_fraction_crf over those slices).
    A threshold that only moves the 0/255 split leaves that Dice unchanged (with the CRF, fg; without,
    bg), so ties go first to the raw Dice (with the CRF on, fg is thus the best fg of the raw mask
    reported beside it), then to the grid point nearest the params' own compat, fg, bg. With
    ``crf.enabled`` false no CRF runs: compat stays as given and the CRF columns are null.
    With no such val slice, ``table`` is empty and the choice is the params' values.
    """
    pm = params.pseudo_masks
    cal = pm.calibration
    # float32 like the maps: the same comparisons as make_pseudo_mask makes with a Python float.
    fgs = np.asarray(cal.fg_grid, dtype=np.float32)
    bgs = np.asarray(cal.bg_grid, dtype=np.float32)
    # Without the CRF there is no compat to search and no CRF to run.
    compats = list(cal.compat_grid) if pm.crf.enabled else [pm.crf.compat]
    objective = "dice_pos_crf" if pm.crf.enabled else "dice_pos_raw"
    val = ds.indices("val", annotated=True)
    # dice_pos needs truth foreground: keep val slices whose (annotated) mask has any.
    keep = []
    for start, stop in _chunks(len(val), pm.chunk_size):
        idx = val[start:stop]
        keep.append(idx[ds.annotated_masks(idx).reshape(len(idx), -1).any(axis=1)])
    val = np.concatenate(keep) if keep else val
    choice = {"fg": pm.fg, "bg": pm.bg, "compat": pm.crf.compat, "objective": objective, "val_slices": 0}
    if val.size == 0:
        return {**choice, "table": []}

    # Sums over slices of per-slice Dice, and pixel counts in the band / ignored.
    dice_raw = np.zeros(len(fgs))
    dice_crf = np.zeros((len(compats), len(bgs)))
    ge_fg = np.zeros(len(fgs))  # pixels with m >= fg
    ge_bg = np.zeros(len(bgs))
    ign_crf = np.zeros((len(compats), len(bgs)))
    pixels = 0
    for start, stop in _chunks(len(val), pm.chunk_size):
        idx = val[start:stop]
        cams = _finite(cam_ds[idx], cams_path, idx)
        images = ds.images(idx)
        truth = ds.annotated_masks(idx) > 0
        lab = labels[idx]
        todo = np.flatnonzero(lab.any(axis=1))  # label-negative slices: all background, Dice 0
        pixels += truth[0].size * len(idx)
        m = np.zeros(truth.shape, dtype=np.float32)
        for j in todo:
            maps = _labelled_maps(normalise_cam(cams[j], normalisation), lab[j], images.shape[1:])[1]
            m[j] = maps.max(axis=0)
        t = truth[:, None]
        tsum = truth.sum(axis=(1, 2))[:, None]

        def dice(pred):  # pred (n, G, H, W) -> per-slice Dice summed over slices, (G,)
            tp = (pred & t).sum(axis=(2, 3))
            return (2 * tp / (pred.sum(axis=(2, 3)) + tsum)).sum(axis=0)

        raw_pred = m[:, None] >= fgs[None, :, None, None]
        dice_raw += dice(raw_pred)
        ge_fg += raw_pred.sum(axis=(0, 2, 3))
        ge = m[:, None] >= bgs[None, :, None, None]
        ge_bg += ge.sum(axis=(0, 2, 3))
        items = [(cams[j], lab[j], images[j]) for j in todo]
        for c, compat in enumerate(compats if pm.crf.enabled else []):
            crf = pm.crf.model_copy(update={"compat": float(compat)})
            crf_fg = np.zeros(truth.shape, dtype=bool)
            for j, res in zip(todo, pool.map(partial(_crf_fg_task, (normalisation, crf)), items)):
                crf_fg[j] = res
            pred = crf_fg[:, None] & ge
            dice_crf[c] += dice(pred)
            ign_crf[c] += (ge & ~pred).sum(axis=(0, 2, 3))

    n = len(val)
    table = []
    for c, compat in enumerate(compats):
        for b, bg in enumerate(cal.bg_grid):
            for f, fg in enumerate(cal.fg_grid):
                if fg <= bg:
                    continue
                table.append(
                    {
                        "fg": float(fg),
                        "bg": float(bg),
                        "compat": float(compat),
                        "dice_pos_raw": float(dice_raw[f] / n),
                        "dice_pos_crf": float(dice_crf[c, b] / n) if pm.crf.enabled else None,
                        "ignore_fraction_raw": float((ge_bg[b] - ge_fg[f]) / pixels),
                        "ignore_fraction_crf": float(ign_crf[c, b] / pixels) if pm.crf.enabled else None,
                    }
                )
    best = min(
        table,
        key=lambda r: (
            -r[objective],
            -r["dice_pos_raw"],
            abs(r["compat"] - pm.crf.compat),
            abs(r["fg"] - pm.fg),
            abs(r["bg"] - pm.bg),
        ),
    )
    choice.update(fg=best["fg"], bg=best["bg"], compat=best["compat"], val_slices=int(n))
    return {**choice, "table": table}


# ---------------------------------------------------------------------------------------------- run


def _open_inputs(params: Params, dataset: Path, cams: Path):
    """Open and cross-check dataset.h5 and cams.h5; return (ds, cams file, normalisation, labels)."""
    classes = list(params.common.classes)
    ds = DatasetFile(dataset)
    try:
        f = open_checked(cams, "cams")
    except BaseException:
        ds.close()
        raise
    try:
        found = json.loads(f.attrs.get("classes", "null"))
        if found != classes:
            raise InvalidInputError(
                f"{cams}: its maps are for classes {found}, but common.classes is {classes}; "
                "re-run the cams stage with these params."
            )
        cam, prob = f["cam"], f["prob"]
        size = int(f.attrs.get("heatmap_size", -1))
        if cam.ndim != 4 or cam.shape[1:] != (len(classes), size, size):
            raise InvalidInputError(
                f"{cams}: cam has shape {cam.shape}, expected (N, {len(classes)}, {size}, {size}) "
                f"for {len(classes)} classes and heatmap_size {size}."
            )
        if cam.shape[0] != ds.n or prob.shape != (ds.n, len(classes)):
            raise InvalidInputError(
                f"{cams}: holds maps of {cam.shape[0]} slices (prob {prob.shape}), but {dataset} has "
                f"{ds.n} slices; the two files do not belong together (re-run the cams stage)."
            )
        normalisation = f.attrs.get("normalisation")
        if normalisation not in NORMALISATIONS:
            raise InvalidInputError(
                f"{cams}: unknown normalisation attribute {normalisation!r}, "
                f"expected one of {NORMALISATIONS}."
            )
        labels = ds.labels_for(classes)
    except BaseException:
        f.close()
        ds.close()
        raise
    return ds, f, str(normalisation), labels


def _trust_summary(fraction, cutoff, trusted, labels, train, trust_dice) -> dict:
    """metrics/pseudo_masks.json ``trust``: the rule, how many labelled train slices it left out, and per
    scored split the output masks' dice_pos on trusted and on untrusted labelled slices."""
    labelled = labels.any(axis=1)[train]
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {
        "untrusted_fraction": float(fraction),
        "cutoff": cutoff if np.isfinite(cutoff) else None,
        "train_labelled_slices": int(labelled.sum()),
        "train_untrusted_slices": int((labelled & (trusted[train] == 0)).sum()),
        **{split: {"trusted": {"slices": len(t), "dice_pos": mean(t)},
                   "untrusted": {"slices": len(u), "dice_pos": mean(u)}}
           for split, (t, u) in trust_dice.items()},
    }


def _write_plots(folder: Path, cal: dict) -> None:
    """``calibration.csv`` (the search table, for `dvc plots`) and ``calibration.png`` (Dice vs threshold)."""
    cols = ["fg", "bg", "compat", "dice_pos_raw", "dice_pos_crf"]
    cols += ["ignore_fraction_raw", "ignore_fraction_crf"]
    cell = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731  (CRF columns are null without CRF)
    lines = [",".join(cols)] + [",".join(cell(r[c]) for c in cols) for r in cal["table"]]
    with atomic_output(folder / "calibration.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fg, ax_bg) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    rows = cal["table"]
    raw = sorted({(r["fg"], r["dice_pos_raw"]) for r in rows})
    ax_fg.plot([x for x, _ in raw], [y for _, y in raw], "o-", label="raw map")
    ax_fg.set(xlabel="fg threshold", ylabel="val dice_pos", title="raw: Dice vs fg")
    for compat in sorted({r["compat"] for r in rows if r["dice_pos_crf"] is not None}):
        pts = sorted({(r["bg"], r["dice_pos_crf"]) for r in rows if r["compat"] == compat})
        ax_bg.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"CRF compat {compat:g}")
    ax_bg.set(xlabel="bg threshold", title="CRF: Dice vs bg")
    for ax in (ax_fg, ax_bg):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(folder / "calibration.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(
    params: Params,
    dataset: str | Path,
    cams: str | Path,
    out: str | Path,
    metrics: str | Path,
    calibration: str | Path,
    plots: str | Path | None = None,
) -> dict:
    """The pseudo_masks stage: write ``out`` (pseudo_masks.h5), ``metrics`` and ``calibration`` JSON.

    Args:
        params: validated params (reads ``common.classes`` and ``pseudo_masks``).
        dataset, cams: dataset.h5 and cams.h5 (checked against each other and against the params).
        out: pseudo_masks.h5, written atomically (contract in docs/ARCHITECTURE.md).
        metrics: metrics/pseudo_masks.json: per split (val, test annotated slices) the scores of the
            ``raw`` thresholded map and of the ``crf`` output, plus the thresholds used.
        calibration: metrics/calibration.json: the chosen values and the search table (the search runs
            in both modes; ``thresholds: fixed`` just does not use its choice).
        plots: optional folder: ``calibration.csv`` (the table, for `dvc plots`) and ``calibration.png``.

    Slices go through in chunks of ``pseudo_masks.chunk_size`` (two chunks in flight at most), so memory
    does not grow with N; the output bytes do not depend on ``pseudo_masks.workers``. Under torchrun
    rank 0 calibrates, every rank makes the masks of a chunk-aligned share of the slices (each with its
    own pool), and rank 0 writes the output and the metrics from the shares: the same bytes.
    Returns the metrics dict (empty on ranks other than 0).
    """
    pm = params.pseudo_masks
    classes = list(params.common.classes)
    dataset, cams, out = Path(dataset), Path(cams), Path(out)
    workers = pm.workers or distributed.local_cpus()
    with ExitStack() as stack:
        pool = _Pool(workers)  # first: its workers must not inherit open HDF5 files (nor gloo threads)
        stack.callback(pool.close)
        distributed.init(backend="gloo")
        ds, cf, normalisation, labels = _open_inputs(params, dataset, cams)
        stack.callback(ds.close)
        stack.callback(cf.close)
        cam_ds = cf["cam"]

        cal = distributed.main_only(calibrate)(params, ds, cam_ds, normalisation, labels, pool, cams)
        if pm.thresholds == "calibrated":
            if cal["val_slices"] == 0:
                raise InvalidInputError(
                    f"{dataset}: no annotated val slice shows foreground, so thresholds cannot be "
                    "calibrated; annotate some val slices or set pseudo_masks.thresholds: fixed."
                )
            fg, bg, compat = cal["fg"], cal["bg"], cal["compat"]
        else:
            fg, bg, compat = pm.fg, pm.bg, pm.crf.compat
        _check_thresholds(fg, bg)
        crf = pm.crf.model_copy(update={"compat": float(compat)})
        settings = (normalisation, fg, bg, crf)

        peaks = map_peaks(cam_ds, labels, pm.chunk_size, cams)
        trusted, cutoff = trusted_slices(peaks, labels, ds.indices("train"), pm.untrusted_fraction)
        scored = {"val": ds.has_mask & (ds.split == 1), "test": ds.has_mask & (ds.split == 2)}
        trust_dice: dict = {split: ([], []) for split in scored}  # per split: Dice of trusted, untrusted
        keys = _scorable(classes, ds.mask_classes)
        variants = ("raw", "crf") if crf.enabled else ("raw",)
        scores = _Scores()
        n, h, w = ds.n, ds.height, ds.width
        task = partial(_mask_task, settings)

        def computed(first: int, last: int):
            """(start, stop, cams, masks) per chunk of rows [first, last); the pool starts it when drawn."""
            for start, stop in _chunks(last, pm.chunk_size, first):
                cams_chunk = _finite(cam_ds[start:stop], cams, start)
                items = list(zip(cams_chunk, labels[start:stop], ds.images(slice(start, stop))))
                yield start, stop, cams_chunk, pool.map(task, items)

        if distributed.world() > 1:  # this rank's share into its part file; rank 0 goes on from them
            first, last = distributed.shard(n, pm.chunk_size)
            if last > first:
                with (
                    atomic_output(distributed.part_path(out)) as tmp,
                    h5py.File(tmp, "w") as f,
                    tqdm(total=last - first, desc="pseudo_masks (rank share)", unit="slice",
                         disable=not distributed.is_main()) as bar,
                ):
                    part = f.create_dataset("mask", (last - first, h, w), np.uint8, chunks=(1, h, w))
                    for start, stop, _, masks in _one_ahead(computed(first, last)):
                        part[start - first : stop - first] = np.stack(list(masks))
                        bar.update(stop - start)
            distributed.barrier()
            if not distributed.is_main():
                return {}
            for r in range(distributed.world()):
                stack.callback(distributed.part_path(out, r).unlink, missing_ok=True)

        def merged():
            """The same chunks from the ranks' part files (cams read only where a slice is scored)."""
            for r, first, last in distributed.shards(n, pm.chunk_size):
                if last == first:
                    continue
                with h5py.File(distributed.part_path(out, r), "r") as part:
                    for start, stop in _chunks(last, pm.chunk_size, first):
                        any_scored = any(sel[start:stop].any() for sel in scored.values())
                        cams_chunk = cam_ds[start:stop] if any_scored else None
                        yield start, stop, cams_chunk, part["mask"][start - first : stop - first]

        def finish(start: int, stop: int, cams_chunk, masks: Iterable[np.ndarray], f: h5py.File) -> None:
            block = np.stack(list(masks))
            f["mask"][start:stop] = block
            f["fg_fraction"][start:stop] = ((block > 0) & (block != IGNORE)).mean(axis=(1, 2))
            f["ignore_fraction"][start:stop] = (block == IGNORE).mean(axis=(1, 2))
            for split, sel in scored.items():
                idx = np.flatnonzero(sel[start:stop])
                if idx.size == 0:
                    continue
                truth = ds.annotated_masks(start + idx)
                for j, mask in zip(idx, truth):
                    truths = {"any": mask > 0} | {
                        k: truth_mask(mask, ds.mask_classes, k) for k in keys if k != "any"
                    }
                    raw = raw_mask(
                        normalise_cam(cams_chunk[j], normalisation), labels[start + j], (h, w), fg, bg
                    )
                    scores.add(split, "raw", raw, truths, classes)
                    if crf.enabled:
                        scores.add(split, "crf", block[j], truths, classes)
                    if labels[start + j].any() and truths["any"].any():  # the output mask's Dice
                        out_fg = (block[j] > 0) & (block[j] != IGNORE)
                        dice = dice_per_slice(out_fg[None], truths["any"][None])[0]
                        trust_dice[split][1 - int(trusted[start + j])].append(float(dice))
            progress.update(stop - start)

        with atomic_output(out) as tmp, h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("mask", (n, h, w), dtype=np.uint8, chunks=(1, h, w), track_times=False)
            f.create_dataset("fg_fraction", (n,), dtype=np.float32, track_times=False)
            f.create_dataset("ignore_fraction", (n,), dtype=np.float32, track_times=False)
            f.create_dataset("map_peak", data=peaks, track_times=False)
            f.create_dataset("trusted", data=trusted, track_times=False)
            f.attrs["kind"] = "pseudo_masks"
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["classes"] = json.dumps(classes)
            f.attrs["fg"] = float(fg)
            f.attrs["bg"] = float(bg)
            f.attrs["crf"] = json.dumps(crf.model_dump(mode="json"), sort_keys=True)
            f.attrs["thresholds"] = pm.thresholds
            f.attrs["trust_cutoff"] = cutoff
            progress = stack.enter_context(tqdm(total=n, desc="pseudo_masks", unit="slice"))
            # Chunk i+1 is read and queued before chunk i is written: the workers never wait on I/O.
            for chunk in _one_ahead(computed(0, n) if distributed.world() == 1 else merged()):
                finish(*chunk, f)

            result = {
                "thresholds": {
                    "mode": pm.thresholds,
                    "fg": float(fg),
                    "bg": float(bg),
                    "compat": float(compat),
                },
                "crf_enabled": crf.enabled,
                "trust": _trust_summary(pm.untrusted_fraction, cutoff, trusted, labels, ds.indices("train"),
                                        trust_dice),
            }
            for split in scored:
                result[split] = {v: scores.summary(split, v, keys) for v in variants}
            write_json(Path(calibration), {"thresholds": pm.thresholds, **cal})
            write_json(Path(metrics), result)
            if plots is not None:
                _write_plots(Path(plots), cal)
    return result
