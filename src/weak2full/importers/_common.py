"""What every importer shares: the Volume/Source records, CSV and path checks, NIfTI reading."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from weak2full.errors import InvalidInputError

# Image-level classes of the CT sources: `any` first, then the five subtypes (RSNA's order).
SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
CLASSES = ["any"] + SUBTYPES


@dataclass
class Volume:
    """One stack of axial slices of one patient, ordered inferior (skull base) to superior (vertex).

    ``image`` (Z, H, W) float32 in HU (or the source's intensity); ``label`` uint8 (Z, K), columns as the
    source's ``classes``; ``mask`` uint8 (Z, H, W) with 0 background and k = ``mask_classes[k-1]``, or
    ``None`` when the source has no masks; ``spacing`` (dy, dx) in mm of one pixel, or ``None`` when the
    format does not carry it. ``patient`` groups volumes for the split (an RSNA patient may have several
    series); ``origin`` names the file(s) for error messages.
    """

    patient: str
    origin: str
    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float] | None


@dataclass
class Source:
    """What an importer found: class names, whether masks exist, and a one-pass iterator of volumes.

    ``provenance`` is complete only once ``volumes`` has been consumed (RSNA counts unreadable files as
    it reads them).
    """

    name: str
    root: Path | None  # None for the synthetic generator
    classes: list[str]
    mask_classes: list[str]
    has_masks: bool
    count: int  # number of volumes ``volumes`` will yield (fewer if files turn out unreadable)
    volumes: Iterator[Volume]
    provenance: dict = field(default_factory=dict)


def check_inside(root: Path, paths: Iterable[Path]) -> None:
    """Refuse any file that resolves (through ``..`` or a symbolic link) to a place outside ``root``.

    An importer reads only what lies inside ``data.path``: a link planted in a data folder must not make
    prepare read, and copy into dataset.h5, some other file of the machine.
    """
    base = root.resolve()
    for path in paths:
        real = Path(path).resolve()
        if not real.is_relative_to(base):
            raise InvalidInputError(
                f"{path}: resolves to {real}, outside the data root {base} (data.path); every file of a "
                "source must lie inside its root."
            )


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InvalidInputError(f"{path}: folder not found; {what}.")
    return path


def read_csv(path: Path, columns: Sequence[str]) -> Iterator[dict[str, str]]:
    """Rows of a CSV file as dicts, streamed (RSNA's has millions), after checking the header."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: file not found.")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InvalidInputError(f"{path}: missing columns {missing} (found {reader.fieldnames}).")
        empty = True
        for row in reader:
            empty = False
            yield row
    if empty:
        raise InvalidInputError(f"{path}: the CSV has no rows.")


def csv_int(path: Path, row: int, column: str, value: str, allowed: Sequence[int] | None = None) -> int:
    """Parse one integer cell; ``row`` is the 0-based data row, reported 1-based after the header."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or (allowed is not None and out not in allowed):
        want = f"one of {list(allowed)}" if allowed is not None else "an integer"
        raise InvalidInputError(f"{path}: row {row + 2}, column {column} must be {want}, got {value!r}.")
    return out


def binary_mask(mask: np.ndarray, origin: str) -> np.ndarray:
    """0/1 uint8 from a mask that outlines bleeds with a single value (1, or 255 in 8-bit exports)."""
    values = np.unique(mask)
    fg = values[values != 0]
    if fg.size > 1 or (fg.size == 1 and fg[0] not in (1, 255)):
        raise InvalidInputError(
            f"{origin}: mask values [{', '.join(f'{v:g}' for v in values[:10])}] are outside the class "
            "range: this source "
            "outlines every bleed as one class, so a mask may hold 0 and one of 1 or 255."
        )
    return (mask > 0).astype(np.uint8)


@dataclass
class AxialVolume:
    """A NIfTI volume as axial slices: ``data`` (Z, H, W), inferior to superior, rows anterior to posterior,
    columns patient right to left (the radiological view); ``stored_index`` (Z,) is each slice's index
    along the stored axis that became axial; ``spacing`` (dy, dx) mm."""

    data: np.ndarray
    stored_axis: int
    stored_index: np.ndarray
    spacing: tuple[float, float]
    affine: np.ndarray


def nifti_header(path: Path):
    """The lazily loaded NIfTI image (header and affine; voxels stay on disk)."""
    try:
        return nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for truncated or foreign files
        raise InvalidInputError(f"{path}: not a readable NIfTI file ({exc}).") from None


def read_axial(path: Path) -> AxialVolume:
    """Load a 3-D NIfTI and reorient it with nibabel's ``as_closest_canonical`` (RAS+)."""
    img = nifti_header(path)
    if len(img.shape) != 3:
        raise InvalidInputError(f"{path}: expected a 3-D volume, got shape {img.shape}.")
    try:
        ornt = nib.io_orientation(img.affine)  # per stored axis: (RAS axis, +1/-1)
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.dataobj, dtype=np.float32)  # (X right, Y anterior, Z superior)
    except Exception as exc:  # noqa: BLE001 - a header that reads, voxels that do not (truncated)
        raise InvalidInputError(f"{path}: not a readable NIfTI file ({exc}).") from None
    stored_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    z = data.shape[2]
    stored_index = np.arange(z)[::-1].copy() if ornt[stored_axis, 1] < 0 else np.arange(z)
    zooms = canon.header.get_zooms()[:3]
    # (X, Y, Z) -> (Z, Y, X), then flip Y (anterior on top) and X (patient right on the left).
    slices = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    return AxialVolume(slices, stored_axis, stored_index, (float(zooms[1]), float(zooms[0])), img.affine)


def same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two affines reorient the same way (what matters for slicing image and mask alike)."""
    return bool(np.array_equal(nib.io_orientation(a), nib.io_orientation(b)))
