"""Any folder of NIfTI volumes with masks (BHSD, MRI lesion sets, your own data).

Two layouts under ``data.path``::

    <case>/<image>.nii(.gz) + <case>/mask.nii(.gz)     one folder per case, exactly one image beside the mask
    images/<case>.nii(.gz)  + masks/<case>.nii(.gz)    two folders, matched by case name

Volumes are reoriented with nibabel's ``as_closest_canonical`` and cut into axial slices (radiological
view, inferior to superior). Slice labels come from the masks. Mask values name the classes: masks holding
only 0 and one other value outline a single class, called ``any``; masks with values 1..M give the classes
``label_1`` .. ``label_M`` (plus ``any``, their union, as the first image-level class).

``data.intensity``: ``hu`` keeps the stored values (CT); ``percentile`` maps each volume's 1st..99th
percentile of non-zero voxels linearly to 0..1000 (MRI), values beyond stay beyond.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from weak2full.errors import InvalidInputError
from weak2full.importers._common import (
    Source,
    Volume,
    check_inside,
    nifti_header,
    read_axial,
    same_orientation,
)

_EXT = (".nii.gz", ".nii")


def _case_name(path: Path) -> str:
    for ext in _EXT:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.name


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_EXT))


def find_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(case, image, mask) for either layout, sorted by case."""
    if (root / "images").is_dir() or (root / "masks").is_dir():
        if not ((root / "images").is_dir() and (root / "masks").is_dir()):
            raise InvalidInputError(f"{root}: the images/ + masks/ layout needs both folders.")
        images = {_case_name(p): p for p in _niftis(root / "images")}
        masks = {_case_name(p): p for p in _niftis(root / "masks")}
        if set(images) - set(masks):
            raise InvalidInputError(
                f"{root / 'masks'}: no mask for images {sorted(set(images) - set(masks))[:10]}."
            )
        if set(masks) - set(images):
            raise InvalidInputError(
                f"{root / 'images'}: no image for masks {sorted(set(masks) - set(images))[:10]}."
            )
        pairs = [(case, images[case], masks[case]) for case in sorted(images)]
    else:
        pairs = []
        for case in sorted(p for p in root.iterdir() if p.is_dir()):
            files = _niftis(case)
            if not files:
                continue
            masks = [p for p in files if _case_name(p) == "mask"]
            others = [p for p in files if _case_name(p) != "mask"]
            if len(masks) != 1 or len(others) != 1:
                raise InvalidInputError(
                    f"{case}: expected one image and one mask.nii(.gz) in each case folder, found "
                    f"{[p.name for p in files]}."
                )
            pairs.append((case.name, others[0], masks[0]))
    if not pairs:
        raise InvalidInputError(
            f"{root}: no NIfTI volumes found; expected <case>/<image>.nii.gz + <case>/mask.nii.gz, "
            "or images/<case>.nii.gz + masks/<case>.nii.gz."
        )
    return pairs


def mask_values(path: Path) -> np.ndarray:
    """Sorted distinct values of a mask volume, checked to be whole numbers in 0..255."""
    values = np.unique(np.asarray(nifti_header(path).dataobj))
    if (
        not np.all(np.isfinite(values))
        or np.any(values != np.round(values))
        or values.min() < 0
        or values.max() > 255
    ):
        raise InvalidInputError(
            f"{path}: mask values must be whole numbers in 0..255 (0 background), got {values[:10].tolist()}."
        )
    return values.astype(np.int64)


def percentile_scale(volume: np.ndarray, origin: str) -> np.ndarray:
    """Map the 1st..99th percentile of non-zero voxels to 0..1000 (float32)."""
    nonzero = volume[volume != 0]
    if nonzero.size == 0:
        raise InvalidInputError(
            f"{origin}: the volume is all zeros; data.intensity 'percentile' has nothing to scale."
        )
    lo, hi = np.percentile(nonzero, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0  # a constant volume: keep it constant instead of dividing by zero
    return ((volume - lo) / (hi - lo) * 1000.0).astype(np.float32)


def load(root: Path, data) -> Source:
    """Pair images with masks, read every mask's values to name the classes, then load volume by volume."""
    pairs = find_pairs(root)
    check_inside(root, [p for _, image, mask in pairs for p in (image, mask)])
    present = sorted(set().union(*(mask_values(m).tolist() for _, _, m in pairs)) - {0})
    binary = len(present) <= 1
    # A binary mask may use any single value (1, 255): it becomes 1.
    mask_classes = ["any"] if binary else [f"label_{k}" for k in range(1, max(present) + 1)]
    classes = ["any"] if binary else ["any", *mask_classes]

    def volumes() -> Iterator[Volume]:
        for case, image_path, mask_path in pairs:
            image, seg = read_axial(image_path), read_axial(mask_path)
            if seg.data.shape != image.data.shape or not same_orientation(image.affine, seg.affine):
                raise InvalidInputError(
                    f"{mask_path}: mask shape {seg.data.shape} or orientation does not match its image "
                    f"{image_path} {image.data.shape}."
                )
            mask = (seg.data > 0) if binary else seg.data
            mask = mask.astype(np.uint8)
            values = image.data if data.intensity == "hu" else percentile_scale(image.data, str(image_path))
            fg = mask.reshape(len(mask), -1)
            label = [fg.max(axis=1) > 0] + (
                [] if binary else [(fg == k).any(axis=1) for k in range(1, len(mask_classes) + 1)]
            )
            yield Volume(
                case, str(image_path), values, np.stack(label, axis=1).astype(np.uint8), mask, image.spacing
            )

    provenance = {
        "files": {"images": len(pairs), "masks": len(pairs)},
        "mask_values": present,
        "intensity": data.intensity,
    }
    return Source("nifti-folder", root, classes, mask_classes, True, len(pairs), volumes(), provenance)
