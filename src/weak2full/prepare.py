"""The prepare stage: a source (synthetic or real files) -> ``dataset.h5`` + a montage of examples.

``run(params, out, montage)`` reads ``params.data``:

1. builds the source: the synthetic generator (``weak2full.synthetic.generate``, seed ``common.seed``) or
   an importer of ``weak2full.importers`` over ``data.path``;
2. checks and resamples each volume as it arrives (pad to square, images by area averaging, masks by
   nearest neighbour, to ``data.image_size``), rounding HU to int16;
3. splits by patient (:func:`split_patients`: seeded, stratified so that train, val and test each hold
   positive patients) and marks the annotated subset (``has_mask``: a share of val and test patients,
   never train, only where the source has masks);
4. writes ``dataset.h5`` through :func:`weak2full.h5.write_dataset` and the montage PNG, both atomically.

Every problem with the input raises :class:`~weak2full.errors.InvalidInputError` naming the file, before
anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weak2full.errors import InvalidInputError
from weak2full.h5 import SPLITS, atomic_output, write_dataset
from weak2full.importers import Source, Volume, load_source, resample_volume
from weak2full.params import DataParams, Params, SplitParams

__all__ = ["Assembled", "assemble", "render_montage", "run", "split_patients", "synthetic_source"]

_INT16 = np.iinfo(np.int16)


def synthetic_source(data: DataParams, seed: int) -> Source:
    """The synthetic generator's output as a Source of one volume per patient."""
    from weak2full import synthetic

    gen = synthetic.generate(data.synthetic, data.image_size, seed)

    def volumes() -> Iterator[Volume]:
        for patient in np.unique(gen.patient):
            rows = np.flatnonzero(gen.patient == patient)
            rows = rows[np.argsort(gen.slice[rows], kind="stable")]
            yield Volume(
                str(int(patient)),
                f"synthetic patient {int(patient)}",
                gen.image[rows].astype(np.float32),
                gen.label[rows],
                gen.mask[rows],
                tuple(gen.pixel_spacing),
            )

    provenance = {
        "generator": data.synthetic.model_dump(mode="json"),
        "seed": seed,
        "image_size": data.image_size,
    }
    n = len(np.unique(gen.patient))
    return Source(
        "synthetic",
        None,
        list(synthetic.CLASSES),
        list(synthetic.MASK_CLASSES),
        True,
        n,
        volumes(),
        provenance,
    )


@dataclass
class Assembled:
    """All slices at ``image_size``: image int16 (N,S,S), mask uint8 (N,S,S), label uint8 (N,K),
    volume int32 (N,) (one id per volume, the ``patient`` field of dataset.h5), slice int32 (N,), and
    ``groups`` (one split key per volume: the source's patient, which may own several volumes)."""

    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    volume: np.ndarray
    slice: np.ndarray
    groups: list[str]
    spacings: list[tuple[float, float]]


def _check_volume(v: Volume, source: Source) -> None:
    if v.image.ndim != 3 or v.image.shape[0] == 0:
        raise InvalidInputError(f"{v.origin}: expected a (slices, H, W) volume, got shape {v.image.shape}.")
    z, k = v.image.shape[0], len(source.classes)
    bad = ~np.isfinite(v.image)
    if bad.any():
        raise InvalidInputError(f"{v.origin}: {int(bad.sum())} voxels are NaN or infinite.")
    if v.label.shape != (z, k) or not np.isin(v.label, (0, 1)).all():
        raise InvalidInputError(f"{v.origin}: labels must be 0/1 of shape ({z}, {k}), got {v.label.shape}.")
    if v.mask is not None:
        if v.mask.shape != v.image.shape:
            raise InvalidInputError(
                f"{v.origin}: mask shape {v.mask.shape} does not match image {v.image.shape}."
            )
        top = int(v.mask.max(initial=0))
        if top > len(source.mask_classes):
            raise InvalidInputError(
                f"{v.origin}: mask value {top} is outside the class range 0..{len(source.mask_classes)} "
                f"(mask classes {source.mask_classes})."
            )


def assemble(source: Source, size: int) -> Assembled:
    """Consume ``source.volumes``: check each volume, resample it to ``size``, stack everything."""
    images, masks, labels, volume, slices, groups, spacings = [], [], [], [], [], [], []
    progress = tqdm(
        source.volumes, total=source.count, desc=f"prepare {source.name}", unit="volume", disable=None
    )
    for i, v in enumerate(progress):
        _check_volume(v, source)
        image, mask, spacing = resample_volume(v.image, v.mask, v.spacing, size, float(v.image.min()))
        if mask is None:  # a source without masks (RSNA): all background, never annotated
            mask = np.zeros(image.shape, np.uint8)
        image = np.rint(image)
        if image.min() < _INT16.min or image.max() > _INT16.max:
            raise InvalidInputError(
                f"{v.origin}: values {image.min():.0f}..{image.max():.0f} do not fit int16 HU; for MRI set "
                "data.intensity: percentile (and input.brain_mask: false)."
            )
        images.append(image.astype(np.int16))
        masks.append(mask.astype(np.uint8))
        labels.append(v.label.astype(np.uint8))
        volume.append(np.full(len(image), i, np.int32))
        slices.append(np.arange(len(image), dtype=np.int32))
        groups.append(v.patient)
        if spacing is not None:
            spacings.append(spacing)
    where = source.root if source.root is not None else f"source '{source.name}'"
    if not images:
        raise InvalidInputError(f"{where}: the dataset is empty (no volumes were found or read).")
    return Assembled(
        np.concatenate(images),
        np.concatenate(masks),
        np.concatenate(labels),
        np.concatenate(volume),
        np.concatenate(slices),
        groups,
        spacings,
    )


def _share(n: int, fraction: float) -> int:
    return int(np.floor(n * fraction + 0.5))  # round half up (Python's round() rounds half to even)


def split_patients(
    keys: Sequence[str], positive: Sequence[bool], sp: SplitParams, seed: int, annotatable: bool
) -> tuple[dict[str, int], dict[str, bool]]:
    """Assign each patient key a split (0 train, 1 val, 2 test) and an annotated flag.

    Positive and negative patients are shuffled apart (``numpy.random.default_rng(seed)``) and each
    group is cut by ``val_fraction`` / ``test_fraction``; when any patient is positive, train, val and
    test each get at least one positive patient. Within val and test, ``annotated_*_fraction`` of the
    patients are annotated, positives and negatives in proportion (at least one positive when the
    fraction is above 0); train never is, nor anything when the source has no masks (``annotatable``
    False).
    """
    keys = list(keys)
    pos = sorted(k for k, p in zip(keys, positive) if p)
    neg = sorted(k for k, p in zip(keys, positive) if not p)
    if len(keys) < 3:
        raise InvalidInputError(f"the data holds {len(keys)} patients; train, val and test need at least 3.")
    if 0 < len(pos) < 3:
        raise InvalidInputError(
            f"only {len(pos)} patients have a positive slice, so a split would get no positive patient: "
            "train, val and test need at least one each (3 in all)."
        )
    rng = np.random.default_rng(seed)
    decisive = pos if pos else neg  # the group that must reach train, val and test
    split: dict[str, int] = {}
    for group in (pos, neg):
        order = [group[i] for i in rng.permutation(len(group))]
        floor = 1 if group is decisive else 0
        n = len(order)
        n_val = max(_share(n, sp.val_fraction), floor)
        n_test = max(_share(n, sp.test_fraction), floor)
        while n_val + n_test > n - floor:  # leave `floor` patients to train
            if n_val > floor and n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        for i, key in enumerate(order):
            split[key] = (
                SPLITS["val"] if i < n_val else SPLITS["test"] if i < n_val + n_test else SPLITS["train"]
            )

    annotated = {k: False for k in keys}
    if annotatable:
        for name, fraction in (("val", sp.annotated_val_fraction), ("test", sp.annotated_test_fraction)):
            members = [[k for k in group if split[k] == SPLITS[name]] for group in (pos, neg)]
            total = _share(len(members[0]) + len(members[1]), fraction)
            n_pos = min(len(members[0]), max(_share(len(members[0]), fraction), int(fraction > 0)))
            for group, n in zip(members, (n_pos, max(total - n_pos, 0))):
                for i in rng.permutation(len(group))[:n]:
                    annotated[group[i]] = True
    return split, annotated


def _short(cls: str) -> str:
    return {
        "any": "any",
        "epidural": "EDH",
        "intraparenchymal": "IPH",
        "intraventricular": "IVH",
        "subarachnoid": "SAH",
        "subdural": "SDH",
    }.get(cls, cls)


def montage_rows(label: np.ndarray, mask: np.ndarray, visible: np.ndarray, n: int = 12) -> np.ndarray:
    """Up to ``n`` slice indices, half positive (preferring slices with a mask to outline), half negative
    (preferring slices where ``visible`` (N,) bool says the window shows tissue, not the empty vertex),
    evenly spread over the dataset so that several patients and levels appear."""
    pos = np.flatnonzero(label[:, 0] > 0)
    shown = pos[mask[pos].max(axis=(1, 2)) > 0]
    if len(shown) < n // 2:
        shown = pos
    neg = np.flatnonzero(label[:, 0] == 0)
    if visible[neg].sum() >= n // 2:
        neg = neg[visible[neg]]
    n_pos = min(len(shown), n // 2 if len(neg) else n)
    n_neg = min(len(neg), n - n_pos)

    def pick(rows: np.ndarray, k: int) -> np.ndarray:
        return rows[np.linspace(0, len(rows) - 1, k).round().astype(int)] if k else rows[:0]

    return np.concatenate([pick(shown, n_pos), pick(neg, n_neg)])


def render_montage(
    path: Path,
    image: np.ndarray,
    mask: np.ndarray,
    label: np.ndarray,
    volume: np.ndarray,
    slice_index: np.ndarray,
    split: np.ndarray,
    classes: Sequence[str],
    window: tuple[float, float],
) -> None:
    """Write a PNG grid of example slices in ``window`` (level, width) with mask outlines, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    level, width = window
    # A slice "shows tissue" when a tenth of it is in the upper three quarters of the window.
    visible = (image > level - width / 4).reshape(len(image), -1).mean(axis=1) > 0.1
    rows = montage_rows(label, mask, visible)
    cols = 4
    fig = Figure(figsize=(2.6 * cols, 2.9 * max(1, -(-len(rows) // cols))))
    FigureCanvasAgg(fig)
    names = {v: k for k, v in SPLITS.items()}
    for i, r in enumerate(rows):
        ax = fig.add_subplot(-(-len(rows) // cols), cols, i + 1)
        ax.imshow(
            image[r], cmap="gray", vmin=level - width / 2, vmax=level + width / 2, interpolation="nearest"
        )
        if mask[r].any():
            ax.contour(mask[r] > 0, levels=[0.5], colors="red", linewidths=0.8)
        found = [_short(c) for c, on in zip(classes, label[r]) if on and c != "any"]
        text = ", ".join(found) if found else ("positive" if label[r, 0] else "negative")
        ax.set_title(f"vol {volume[r]} z{slice_index[r]} {names[int(split[r])]}\n{text}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"window {level:g}/{width:g}; red: mask outline", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def run(params: Params, out: Path, montage: Path | None = None) -> None:
    """Build ``out`` (dataset.h5) from ``params.data`` and, when given, the montage PNG."""
    data, seed = params.data, params.common.seed
    source = synthetic_source(data, seed) if data.source == "synthetic" else load_source(data)
    if not source.classes or source.classes[0] != "any":
        raise InvalidInputError(
            f"source '{source.name}': the first class must be 'any', got {source.classes}."
        )
    arr = assemble(source, data.image_size)

    volume_positive = np.zeros(len(arr.groups), bool)
    np.logical_or.at(volume_positive, arr.volume, arr.label[:, 0] > 0)
    keys = sorted(set(arr.groups))
    group_positive = {k: False for k in keys}
    for g, p in zip(arr.groups, volume_positive):
        group_positive[g] |= bool(p)
    where = source.root if source.root is not None else f"source '{source.name}'"
    try:
        split_of, annotated = split_patients(
            keys, [group_positive[k] for k in keys], data.split, seed, source.has_masks
        )
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    split = np.array([split_of[arr.groups[v]] for v in arr.volume], np.uint8)
    has_mask = np.array([annotated[arr.groups[v]] for v in arr.volume], bool)

    spacing = np.median(np.array(arr.spacings), axis=0).tolist() if arr.spacings else None
    provenance = {
        "source": source.name,
        "path": str(source.root) if source.root is not None else None,
        "volumes": len(arr.groups),
        "patients": len(keys),
        "positive_patients": int(sum(group_positive.values())),
        "slices": len(arr.image),
        "positive_slices": int((arr.label[:, 0] > 0).sum()),
        "annotated_slices": int(has_mask.sum()),
        # One id per volume in `patient`; this maps it back to the source's own patient name.
        "volume_patient": arr.groups,
        **source.provenance,
    }
    if arr.spacings:
        provenance["pixel_spacing_range"] = [
            np.min(arr.spacings, axis=0).tolist(),
            np.max(arr.spacings, axis=0).tolist(),
        ]
    write_dataset(
        out,
        image=arr.image,
        patient=arr.volume,
        slice_index=arr.slice,
        label=arr.label,
        mask=arr.mask,
        has_mask=has_mask,
        split=split,
        classes=source.classes,
        mask_classes=source.mask_classes,
        masks_complete=source.has_masks,
        source=source.name,
        provenance=provenance,
        pixel_spacing=spacing,
        params=data.model_dump(mode="json"),
    )
    if montage is not None:
        window = (500.0, 1000.0) if data.intensity == "percentile" else (40.0, 80.0)
        render_montage(
            Path(montage),
            arr.image,
            arr.mask,
            arr.label,
            arr.volume,
            arr.slice,
            split,
            source.classes,
            window,
        )
