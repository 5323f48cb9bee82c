"""From HU slices to network inputs: windowing, channel building, augmentation, Datasets and sampling.

Everything here runs at load time, so a window or the channel mode is a parameter, not a re-prepare:

* :func:`window` and :func:`build_channels` turn HU into float32 channels in 0..1 (``input.mode``).
* :func:`neighbours` finds the previous/next slice of the same patient (edge slices repeat themselves);
  :func:`context_rows` the window of n slices a slice-context network reads, and :func:`model_input`
  builds a batch either way.
* :class:`SliceDataset` reads ``dataset.h5`` lazily (one file handle per DataLoader worker, never a
  whole array) and yields ``(x, target)``: image labels for classifiers, per-class masks for segmenters.
* :func:`make_augmentation` is the CT augmentation (flip, small affine, HU offset and noise), applied to
  HU before windowing so that an intensity shift behaves like a scanner offset, not a contrast change.
* :class:`BalancedBatchSampler` draws batches with a fixed share of positive slices, seeded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import albumentations as A
import cv2
import h5py
import numpy as np
import torch

from weak2full.brain import BONE_HU, intracranial_mask
from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.h5 import DatasetFile, open_checked
from weak2full.params import AugmentParams, InputParams

__all__ = [
    "window",
    "build_channels",
    "neighbours",
    "current_plane",
    "context_rows",
    "model_input",
    "mask_targets",
    "make_augmentation",
    "SliceDataset",
    "BalancedBatchSampler",
    "AIR_HU",
    "IGNORE",
]

AIR_HU = -1000.0  # what lies outside the head: the fill value of the affine augmentation
IGNORE = 255  # mask value of pixels that carry no training signal


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and scale to 0..1 (float32)."""
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / float(width), 0.0, 1.0)


def neighbours(patient: np.ndarray, idx: np.ndarray,
               slice_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the previous and next slice of the same patient, (n,) each.

    Slices of one patient are contiguous and sorted (the dataset.h5 contract), so the neighbour is the
    adjacent row when it belongs to the same patient; at a patient's first/last slice it is the slice itself.
    With ``slice_index`` (one per row), the adjacent row must also be one slice away, so a missing slice
    (or rows that are a subset of a stack) is no neighbour either.
    """
    idx = np.asarray(idx, dtype=np.int64)
    n = patient.shape[0]
    prev = np.maximum(idx - 1, 0)
    nxt = np.minimum(idx + 1, n - 1)
    same_prev, same_nxt = patient[prev] == patient[idx], patient[nxt] == patient[idx]
    if slice_index is not None:
        same_prev &= np.abs(slice_index[prev] - slice_index[idx]) == 1
        same_nxt &= np.abs(slice_index[nxt] - slice_index[idx]) == 1
    return np.where(same_prev, prev, idx), np.where(same_nxt, nxt, idx)


def context_rows(patient: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """Rows of the n-slice window centred on each of ``idx``, (len(idx), n) int64.

    Offsets -(n-1)/2 .. (n-1)/2 within the same patient (rows are contiguous and sorted per patient);
    past a patient's first or last slice the edge slice repeats, so no window mixes two patients.
    """
    idx = np.asarray(idx, dtype=np.int64)
    half = n // 2
    out = np.repeat(idx[:, None], n, axis=1)
    for step in range(1, half + 1):  # walk out from the centre; at a patient's edge, repeat the edge
        for sign in (-1, 1):
            inner = out[:, half + sign * (step - 1)]
            cand = np.clip(inner + sign, 0, len(patient) - 1)
            out[:, half + sign * step] = np.where(patient[cand] == patient[idx], cand, inner)
    return out


def model_input(images, idx, patient: np.ndarray, input_params: InputParams, context: int = 1) -> np.ndarray:
    """Network input of dataset rows ``idx``: float32 (n, C, H, W), or (n, T, C, H, W) for ``context`` T > 1
    (the window of :func:`context_rows`, each slice built like a single one)."""
    idx = np.asarray(idx, dtype=np.int64)
    if context <= 1:
        return build_channels(source_stack(images, idx, patient, input_params.mode), input_params)
    rows = context_rows(patient, idx, context)
    planes = source_stack(images, rows.ravel(), patient, input_params.mode)
    planes = planes.reshape(rows.shape + planes.shape[1:])
    return build_channels(planes, input_params)


def source_stack(images: np.ndarray, idx: np.ndarray, patient: np.ndarray, mode: str) -> np.ndarray:
    """HU planes a sample's channels are built from, float32 (n, P, H, W).

    ``windows``: P = 1, the slice itself. ``slices`` and ``windows_neighbours``: P = 3, previous, current,
    next.
    ``images`` is an h5py dataset or an array indexed by dataset row.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if mode == "windows":
        rows = [idx]
    else:
        prev, nxt = neighbours(patient, idx)
        rows = [prev, idx, nxt]
    planes = [_read_rows(images, r) for r in rows]
    return np.stack(planes, axis=1).astype(np.float32)


def current_plane(hu_planes: np.ndarray, mode: str) -> np.ndarray:
    """The slice itself (n, H, W) among the planes of :func:`source_stack` (``slices``: the middle one)."""
    return hu_planes[:, 0] if mode == "windows" else hu_planes[:, hu_planes.shape[1] // 2]


def build_channels(hu_planes: np.ndarray, input_params: InputParams) -> np.ndarray:
    """Network channels from HU planes: (..., P, H, W) -> (..., C, H, W) float32 in 0..1.

    ``windows`` mode (P = 1): one channel per window in ``input.windows``. ``slices`` mode (P = 3):
    previous/current/next slice, each in ``input.slice_window``. ``windows_neighbours`` (P = 3): the
    current slice in every window of ``input.windows``, then previous and next in ``input.slice_window``.
    """
    hu_planes = np.asarray(hu_planes, dtype=np.float32)
    if input_params.skull_strip:  # outside the skull reads as air in every window (weak2full.brain)
        hu_planes = np.where(intracranial_mask(hu_planes), hu_planes, AIR_HU).astype(np.float32)
    if input_params.mode == "windows":
        plane = hu_planes[..., 0, :, :]
        return np.stack([window(plane, lv, wd) for lv, wd in input_params.windows], axis=-3)
    level, width = input_params.slice_window
    if input_params.mode == "slices":
        return window(hu_planes, level, width)
    current = [window(hu_planes[..., 1, :, :], lv, wd) for lv, wd in input_params.windows]
    neighbours = [window(hu_planes[..., k, :, :], level, width) for k in (0, 2)]
    return np.stack(current + neighbours, axis=-3)


def mask_targets(mask: np.ndarray, value_classes: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Per-class binary targets (K, H, W) uint8 from a 0/k/255 mask; 255 (ignore) stays 255 everywhere.

    ``value_classes[k-1]`` is what mask value k means (``mask_classes`` of dataset.h5, or the classes of
    pseudo_masks.h5). ``any`` is the union of all foreground values, so "any" and a subtype can both be
    1 at a pixel: that is why segmenters here are multi-label (K sigmoid channels).
    """
    ignore = mask == IGNORE
    fg = (mask > 0) & ~ignore
    out = np.empty((len(classes),) + mask.shape, np.uint8)
    for k, cls in enumerate(classes):
        if cls == "any":
            out[k] = fg
        else:
            out[k] = mask == (list(value_classes).index(cls) + 1)
        out[k][ignore] = IGNORE
    return out


def check_mask_classes(value_classes: Sequence[str], classes: Sequence[str], where: str) -> None:
    """Raise InvalidInputError if a class cannot be read off masks whose values mean ``value_classes``."""
    missing = [c for c in classes if c != "any" and c not in value_classes]
    if missing:
        raise InvalidInputError(
            f"{where}: masks hold the classes {list(value_classes)}, so the classes {missing} of "
            f"common.classes cannot be trained on them."
        )


SOFT_TISSUE_HU = 40.0  # what fills a fracture line through the bone


def skull_gap(planes: np.ndarray, rng: np.random.Generator, width_px: float = 1.5) -> np.ndarray:
    """(P, H, W) HU planes with one thin radial gap cut through the skull, as a fracture line looks.

    Skull fractures accompany bleeds (38% of positive and 3% of negative real CT-ICH slices, DESIGN.md),
    so a classifier trained on image labels learns to look at them and its map peaks at the skull instead
    of the bleed. A gap cut at a random angle on any slice, positive or negative, makes the bone's
    integrity carry no label. The gap is ``width_px`` wide along the arc, through every pixel above
    :data:`weak2full.brain.BONE_HU`, the same angle on all planes (a fracture spans neighbouring slices).
    """
    bone = (planes > BONE_HU).any(axis=0)
    head = (planes > -500.0).any(axis=0)
    if not bone.any():
        return planes
    yy, xx = np.nonzero(head)
    cy, cx = yy.mean(), xx.mean()
    gy, gx = np.mgrid[: planes.shape[-2], : planes.shape[-1]]
    theta = rng.uniform(-np.pi, np.pi)
    diff = np.angle(np.exp(1j * (np.arctan2(gy - cy, gx - cx) - theta)))  # wrapped to (-pi, pi]
    gap = bone & (np.abs(diff) * np.hypot(gy - cy, gx - cx) < width_px / 2)  # one ray from the centre
    out = planes.copy()
    out[:, gap] = np.where(planes[:, gap] > BONE_HU, SOFT_TISSUE_HU, planes[:, gap])
    return out


def make_augmentation(p: AugmentParams, crop_size: int | None = None) -> A.Compose:
    """Geometric CT augmentation on (H, W, P) float32 HU with an (H, W) uint8 mask.

    Horizontal flip (heads are roughly left-right symmetric) and a small affine; HU outside the image is
    filled with air and mask with background (nearest-neighbour, so 255 stays 255). The intensity part
    (HU offset, noise) is applied by :meth:`SliceDataset._augment` with the same per-sample seed.
    ``crop_size``: then a crop_size x crop_size patch holding a foreground pixel where the mask has one
    (255, ignore, does not count), anywhere otherwise.
    """
    crop = [A.CropNonEmptyMaskIfExists(crop_size, crop_size, ignore_values=[255])] if crop_size else []
    return A.Compose(
        [
            A.HorizontalFlip(p=p.hflip),
            A.Affine(
                scale=(1.0 - p.scale, 1.0 + p.scale),
                translate_percent=(-p.shift, p.shift),
                rotate=(-p.rotate_deg, p.rotate_deg),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                fill=AIR_HU,
                fill_mask=0,
                p=p.affine,
            ),
            *crop,
        ],
        seed=0,
    )


class SliceDataset(torch.utils.data.Dataset):
    """Slices of ``dataset.h5`` as ``(x, target)`` pairs, read lazily.

    ``x`` is float32 (C, H, W) in 0..1 (:func:`build_channels`). ``target`` depends on ``targets``:

    * ``"label"``: float32 (K,) image labels of ``classes`` (classifiers);
    * ``"pseudo"``: uint8 (K, H, W) from ``pseudo_path`` (pseudo_masks.h5 ``mask``; 255 ignore);
    * ``"annotated"``: uint8 (K, H, W) true masks through ``DatasetFile.annotated_masks`` (val/test
      slices of the annotated subset: model selection and calibration);
    * ``"oracle"``: uint8 (K, H, W) true masks through ``DatasetFile.all_masks`` (the oracle only).

    An item is addressed by position in ``indices`` or by ``(position, seed)`` from
    :class:`BalancedBatchSampler`; the seed drives augmentation, so a run is reproducible whatever the
    number of workers. No file handle is opened before the first item, and pickling drops it: each
    DataLoader worker opens its own.
    """

    def __init__(
        self,
        dataset_path: str | Path,
        indices: Sequence[int],
        input_params: InputParams,
        classes: Sequence[str],
        targets: str = "label",
        augment: AugmentParams | None = None,
        pseudo_path: str | Path | None = None,
        crop_size: int | None = None,
        context_slices: int = 1,
    ):
        if targets not in ("label", "pseudo", "annotated", "oracle"):
            raise ValueError(f"targets must be label, pseudo, annotated or oracle, got {targets!r}")
        if targets == "pseudo" and pseudo_path is None:
            raise ValueError("targets='pseudo' needs pseudo_path")
        self.dataset_path = Path(dataset_path)
        self.pseudo_path = Path(pseudo_path) if pseudo_path is not None else None
        self.indices = np.asarray(indices, dtype=np.int64)
        self.input_params = input_params
        self.classes = list(classes)
        self.targets = targets
        self.context_slices = context_slices  # > 1: x is the (T, C, H, W) window of a slice-context network
        self.augment = augment
        if crop_size is not None and (targets == "label" or augment is None):
            raise ValueError("crop_size needs mask targets and augmentation (a crop can cut a lesion out "
                             "of an image label)")
        self._aug = make_augmentation(augment, crop_size) if augment is not None else None
        self._file: DatasetFile | None = None
        self._pseudo: h5py.File | None = None
        # Small per-slice vectors are read once here (cheap) so that the sampler can use them.
        with DatasetFile(self.dataset_path) as f:
            self.patient = f.patient.copy()
            self.labels = f.labels_for(self.classes)[self.indices].astype(np.float32)
            self.mask_classes = f.mask_classes
            self.image_size = (f.height, f.width)
            if crop_size is not None and crop_size > min(self.image_size):
                raise InvalidParameterError(
                    f"The crop_size parameter ({crop_size}) is larger than the {f.height}x{f.width} "
                    f"slices of {self.dataset_path}; use at most {min(self.image_size)} or null."
                )
            if targets == "annotated" and not f.has_mask[self.indices].all():
                raise InvalidInputError(
                    f"{self.dataset_path}: targets='annotated' asked for slices outside the annotated subset."
                )
        if targets in ("annotated", "oracle"):
            check_mask_classes(self.mask_classes, self.classes, str(self.dataset_path))
        if targets == "pseudo":
            with open_checked(self.pseudo_path, "pseudo_masks") as p:
                self.pseudo_classes = list(json.loads(p.attrs["classes"]))
                if p["mask"].shape[0] != len(self.patient):
                    raise InvalidInputError(
                        f"{self.pseudo_path}: {p['mask'].shape[0]} masks for {len(self.patient)} slices in "
                        f"{self.dataset_path}; re-run pseudo_masks."
                    )
            check_mask_classes(self.pseudo_classes, self.classes, str(self.pseudo_path))

    @property
    def positive(self) -> np.ndarray:
        """(len,) bool: slice labelled with any of ``classes`` (for balanced sampling)."""
        return self.labels.max(axis=1) > 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pseudo"] = None
        return state

    def _open(self) -> DatasetFile:
        if self._file is None:
            self._file = DatasetFile(self.dataset_path)
            if self.targets == "pseudo":
                self._pseudo = h5py.File(self.pseudo_path, "r")
        return self._file

    def _raw_mask(self, row: int) -> np.ndarray | None:
        f = self._open()
        if self.targets == "pseudo":
            return self._pseudo["mask"][row]
        if self.targets == "annotated":
            return f.annotated_masks([row])[0]
        if self.targets == "oracle":
            return f.all_masks([row])[0]
        return None

    def __getitem__(self, item):
        pos, seed = item if isinstance(item, tuple) else (item, None)
        row = int(self.indices[pos])
        f = self._open()
        t = self.context_slices
        rows = context_rows(self.patient, np.array([row]), t)[0] if t > 1 else np.array([row])
        planes = source_stack(f.h5["image"], rows, self.patient, self.input_params.mode)  # (T, P, H, W)
        planes = planes.reshape((-1,) + planes.shape[2:])  # one geometric transform for the whole window
        mask = self._raw_mask(row)
        if self._aug is not None and seed is not None:
            planes, mask = self._augment(planes, mask, seed)
        planes = planes.reshape((t, -1) + planes.shape[1:]) if t > 1 else planes
        x = torch.from_numpy(np.ascontiguousarray(build_channels(planes, self.input_params)))
        if self.targets == "label":
            return x, torch.from_numpy(self.labels[pos])
        value_classes = self.pseudo_classes if self.targets == "pseudo" else self.mask_classes
        return x, torch.from_numpy(mask_targets(mask, value_classes, self.classes))

    def _augment(self, planes: np.ndarray, mask: np.ndarray | None, seed: int):
        """Geometric + intensity augmentation of (P, H, W) HU planes and the raw mask, seeded per sample."""
        self._aug.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        if self.augment.skull_gap > 0 and rng.uniform() < self.augment.skull_gap:
            planes = skull_gap(planes, rng)
        data = {"image": np.ascontiguousarray(planes.transpose(1, 2, 0))}
        if mask is not None:
            data["mask"] = mask
        out = self._aug(**data)
        planes = out["image"].transpose(2, 0, 1)
        offset = rng.uniform(-self.augment.intensity_hu, self.augment.intensity_hu)
        noise = rng.normal(0.0, self.augment.noise_hu, planes.shape) if self.augment.noise_hu > 0 else 0.0
        planes = (planes + offset + noise).astype(np.float32)
        return planes, out.get("mask")


class BalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(position, seed)`` with a fixed share of positive slices, reproducible from ``seed``.

    Each batch holds ``round(positive_fraction * batch_size)`` positives drawn from ``positive``
    (without replacement until the pool is used up, then reshuffled) and the rest negatives.
    ``positive_fraction=None`` draws uniformly from all slices. Call :meth:`set_epoch` so that each epoch
    draws differently while staying a function of (seed, epoch).
    """

    def __init__(
        self,
        positive: np.ndarray,
        batch_size: int,
        steps: int,
        positive_fraction: float | None,
        seed: int,
    ):
        self.positive = np.asarray(positive, bool)
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.epoch = 0
        if positive_fraction is None or not self.positive.any() or self.positive.all():
            self.n_pos = None
        else:
            self.n_pos = int(round(positive_fraction * batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.n_pos is None:
            pools = [(_Pool(np.arange(len(self.positive)), rng), self.batch_size)]
        else:
            pools = [
                (_Pool(np.flatnonzero(self.positive), rng), self.n_pos),
                (_Pool(np.flatnonzero(~self.positive), rng), self.batch_size - self.n_pos),
            ]
        for _ in range(self.steps):
            batch = np.concatenate([pool.take(k) for pool, k in pools])
            rng.shuffle(batch)
            seeds = rng.integers(0, 2**31 - 1, size=len(batch))
            yield [(int(b), int(s)) for b, s in zip(batch, seeds)]


class _Pool:
    """Draw without replacement from ``items``, reshuffling when exhausted."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items, self.rng, self.order, self.at = items, rng, items[:0], 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.at >= len(self.order):
                self.order, self.at = self.rng.permutation(self.items), 0
            got = self.order[self.at : self.at + k]
            self.at += len(got)
            k -= len(got)
            out.append(got)
        return np.concatenate(out) if out else self.items[:0]


def _read_rows(images, rows: np.ndarray) -> np.ndarray:
    if isinstance(images, h5py.Dataset):
        if len(rows) == 1:
            return images[int(rows[0])][None]
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        data = images[uniq]
        out = np.empty((len(rows),) + data.shape[1:], data.dtype)
        out[order] = data[inverse]
        return out
    return np.asarray(images)[rows]
