"""The intracranial region of a head CT slice, from its HU values alone.

A bleed lies inside the skull: epidural and subdural blood against its inner table, the other subtypes
in the brain. A classifier trained on image labels also learns what merely *accompanies* bleeds, above
all skull fractures (seen on 38% of positive and 3% of negative slices of real CT-ICH; the synthetic
default carries the same shortcut), and its map's peak then sits on the bone. Measured on 200 synthetic
patients, 24-28% of the heatmap network's peaks on positive slices fell outside the intracranial region;
restricting the map to it raised ``point_acc`` by 0.04-0.06 and the best map Dice by 0.03.

:func:`intracranial_mask` is the usual skull-stripping recipe, no labels involved: bone is HU above
``bone_hu``; a morphological closing bridges fracture lines and foramina a few pixels wide; the filled
inside of the closed skull minus the bone is the intracranial region. A slice without a closed skull
(skull base, vertex caps, a non-CT source) keeps every pixel, so the mask can only remove evidence that
lies outside a skull it found.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["intracranial_mask", "restrict_to_brain"]

BONE_HU = 250.0  # cortical bone is > 700 HU, calcifications 100-400 HU, acute blood < 90 HU
CLOSING = 2  # iterations of a 3x3 square: bridges gaps of up to 4 pixels
MIN_FRACTION = 0.02  # a region smaller than this share of the slice is not taken as a skull's inside


def intracranial_mask(hu: np.ndarray, bone_hu: float = BONE_HU) -> np.ndarray:
    """Bool (..., H, W): pixels inside the skull of each HU slice (all True where no skull is closed)."""
    hu = np.asarray(hu)
    flat = hu.reshape(-1, *hu.shape[-2:])
    out = np.ones(flat.shape, bool)
    square = np.ones((3, 3), bool)
    for i, plane in enumerate(flat):
        bone = plane > bone_hu
        if not bone.any():
            continue
        closed = ndi.binary_closing(bone, square, iterations=CLOSING, border_value=0)
        inside = ndi.binary_fill_holes(closed) & ~closed
        if inside.mean() >= MIN_FRACTION:
            out[i] = inside
    return out.reshape(hu.shape)


def restrict_to_brain(maps: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Raw class maps (n, K, S, S) with every pixel outside ``brain`` (n, H, W) set to the median of the
    map inside it: the map's background level, so that any normalisation (relative, max, sigmoid) reads
    outside pixels as background. ``brain`` is resized to S by nearest neighbour."""
    maps = np.array(maps, dtype=np.float32, copy=True)
    n, _, s, _ = maps.shape
    if brain.shape[-1] != s:
        step = brain.shape[-1] / s
        pick = np.minimum((np.arange(s) * step + step / 2).astype(int), brain.shape[-1] - 1)
        brain = brain[:, pick][:, :, pick]
    for i in range(n):
        inside = brain[i]
        if inside.all():
            continue
        for k in range(maps.shape[1]):
            m = maps[i, k]
            m[~inside] = np.median(m[inside])
    return maps
