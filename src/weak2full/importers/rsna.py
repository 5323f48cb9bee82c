"""RSNA Intracranial Hemorrhage Detection: DICOM slices with six image-level labels, no masks.

Layout under ``data.path``: ``stage_2_train.csv`` (columns ``ID``, ``Label``; one row per image and
subtype, ``ID_<image>_<subtype>`` with the subtypes ``any``, ``epidural``, ``intraparenchymal``,
``intraventricular``, ``subarachnoid``, ``subdural``) and the DICOM files ``ID_<image>.dcm`` anywhere
below (Kaggle ships them in ``stage_2_train/``).

Slices are grouped into volumes by SeriesInstanceUID and sorted by ImagePositionPatient z; splits group
the series of one PatientID. HU = stored x RescaleSlope + RescaleIntercept, after the fix that the Kaggle
community found for some 12-bit unsigned images whose intercept is not about -1024: add 1000, wrap values
at 4096, and use an intercept of -1000. A file that pydicom cannot read, or that lacks a tag needed here,
is skipped and listed in the provenance; above ``data.max_unreadable_fraction`` of all files the import
fails.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from weak2full.errors import InvalidInputError
from weak2full.importers._common import CLASSES, Source, Volume, check_inside, read_csv

CSV_NAME = "stage_2_train.csv"
_ROW_ID = re.compile(r"^(ID_[0-9A-Za-z]+)_(" + "|".join(CLASSES) + r")$")
_FILE_ID = re.compile(r"^ID_[0-9A-Za-z]+$")
_LISTED = 20  # unreadable files named in an error message


def read_labels(csv_path: Path) -> dict[str, np.ndarray]:
    """image id -> uint8 (6,) labels in CLASSES order; every image needs all six subtypes."""
    unset = 255
    out: dict[str, np.ndarray] = {}
    for i, row in enumerate(read_csv(csv_path, ["ID", "Label"])):
        match = _ROW_ID.match(row["ID"] or "")
        if match is None:
            raise InvalidInputError(
                f"{csv_path}: row {i + 2}, ID {row['ID']!r} is not ID_<image>_<subtype> with a subtype "
                f"in {CLASSES}."
            )
        if row["Label"] not in ("0", "1"):
            raise InvalidInputError(f"{csv_path}: row {i + 2}, Label must be 0 or 1, got {row['Label']!r}.")
        image, subtype = match.groups()
        labels = out.setdefault(image, np.full(len(CLASSES), unset, np.uint8))
        k, value = CLASSES.index(subtype), int(row["Label"])
        if labels[k] not in (unset, value):  # Kaggle's CSV repeats some rows, identically
            raise InvalidInputError(f"{csv_path}: row {i + 2} gives {row['ID']} a second, different label.")
        labels[k] = value
    incomplete = [img for img, labels in out.items() if (labels == unset).any()]
    if incomplete:
        raise InvalidInputError(
            f"{csv_path}: images {incomplete[:10]} lack rows for some of the subtypes {CLASSES}."
        )
    return out


def find_dicoms(root: Path) -> dict[str, Path]:
    """image id -> file, for every ``*.dcm`` below ``root``."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.dcm")):
        if not _FILE_ID.match(path.stem):
            raise InvalidInputError(f"{path}: expected a file named ID_<image>.dcm as in {CSV_NAME}.")
        if path.stem in found:
            raise InvalidInputError(f"{path}: image {path.stem} also exists as {found[path.stem]}.")
        found[path.stem] = path
    return found


def to_hu(ds) -> np.ndarray:
    """(H, W) float32 HU of one DICOM dataset, with the 12-bit fix."""
    pixels = ds.pixel_array.astype(np.float32)
    intercept, slope = float(ds.RescaleIntercept), float(ds.RescaleSlope)
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and intercept > -100:
        pixels = pixels + 1000
        pixels[pixels >= 4096] -= 4096
        intercept = -1000.0
    return pixels * slope + intercept


def _header(path: Path) -> dict:
    """The tags this importer needs; raises on an unreadable file or a missing tag."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return {
        "patient": str(ds.PatientID),
        "series": str(ds.SeriesInstanceUID),
        "z": float(ds.ImagePositionPatient[2]),
        "spacing": (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        "check": (
            float(ds.RescaleSlope),
            float(ds.RescaleIntercept),
            int(ds.BitsStored),
            int(ds.PixelRepresentation),
        ),
    }


def load(root: Path, data) -> Source:
    """Match CSV and files, read every header, then hand out one series at a time."""
    csv_path = root / CSV_NAME
    check_inside(root, [csv_path])
    labels = read_labels(csv_path)
    files = find_dicoms(root)
    check_inside(root, files.values())
    if set(labels) - set(files):
        missing = sorted(set(labels) - set(files))
        raise InvalidInputError(
            f"{csv_path}: rows of {len(missing)} images have no ID_<image>.dcm file under {root}, e.g. "
            f"{missing[:10]}; drop those rows to import a subset."
        )
    if set(files) - set(labels):
        extra = [files[i].name for i in sorted(set(files) - set(labels))]
        raise InvalidInputError(
            f"{root}: {len(extra)} DICOM files have no rows in {csv_path}, e.g. {extra[:10]}."
        )
    if not files:
        raise InvalidInputError(f"{root}: no DICOM files (*.dcm) found.")

    unreadable: dict[str, str] = {}  # file name -> reason

    def check_unreadable() -> None:
        share = len(unreadable) / len(files)
        if share > data.max_unreadable_fraction:
            listed = "; ".join(f"{k}: {v}" for k, v in sorted(unreadable.items())[:_LISTED])
            raise InvalidInputError(
                f"{root}: {len(unreadable)} of {len(files)} DICOM files ({share:.1%}) are unreadable, above "
                f"data.max_unreadable_fraction={data.max_unreadable_fraction}: {listed}"
            )

    series: dict[tuple[str, str], list[tuple[float, str, dict]]] = defaultdict(list)
    for image_id, path in tqdm(files.items(), desc="rsna headers", unit="file", disable=None):
        try:
            head = _header(path)
        except Exception as exc:  # noqa: BLE001 - any pydicom failure makes the file unusable here
            unreadable[path.name] = f"{type(exc).__name__}: {exc}"
            continue
        series[(head["patient"], head["series"])].append((head["z"], image_id, head))
    check_unreadable()

    provenance = {"files": {"dicom": len(files), "csv_images": len(labels)}, "unreadable": unreadable}

    def volumes() -> Iterator[Volume]:
        for (patient, uid), members in sorted(series.items()):
            members.sort(key=lambda m: (m[0], m[1]))  # by z, then by id for ties
            slices, kept = [], []
            for _, image_id, _ in members:
                try:
                    slices.append(to_hu(pydicom.dcmread(str(files[image_id]))))
                    kept.append(image_id)
                except Exception as exc:  # noqa: BLE001 - as above: the file is unusable
                    unreadable[files[image_id].name] = f"{type(exc).__name__}: {exc}"
            if kept:
                shapes = {s.shape for s in slices}
                if len(shapes) > 1:
                    raise InvalidInputError(f"{root}: series {uid} mixes slice shapes {sorted(shapes)}.")
                spacing = members[0][2]["spacing"]
                label = np.stack([labels[i] for i in kept])
                yield Volume(
                    patient,
                    f"series {uid} ({files[kept[0]].name}, ...)",
                    np.stack(slices),
                    label,
                    None,
                    spacing,
                )
        check_unreadable()

    return Source("rsna", root, list(CLASSES), [], False, len(series), volumes(), provenance)
