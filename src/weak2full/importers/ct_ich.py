"""PhysioNet CT-ICH (v1.3.1): NIfTI CT volumes, one-class bleed masks and a per-slice diagnosis CSV.

Layout under ``data.path``::

    ct_scans/049.nii ...             one CT volume per patient (HU), axial slices along the third axis
    masks/049.nii ...                the same grid, every bleed outlined as one class
    hemorrhage_diagnosis_raw_ct.csv  PatientNumber, SliceNumber (1-based index along the third axis),
                                     Intraventricular, Intraparenchymal, Subarachnoid, Epidural, Subdural,
                                     No_Hemorrhage, Fracture_Yes_No (0/1 each)

Every CSV row must have its slice and every slice its row. Volumes are reoriented to the radiological
axial view (inferior to superior); a slice's CSV row is found through its index along the stored axis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from weak2full.errors import InvalidInputError
from weak2full.importers._common import (
    CLASSES,
    Source,
    Volume,
    binary_mask,
    check_inside,
    csv_int,
    nifti_header,
    read_axial,
    read_csv,
    require_dir,
    same_orientation,
)

CSV_NAME = "hemorrhage_diagnosis_raw_ct.csv"
# CSV column of each subtype in CLASSES[1:] order.
SUBTYPE_COLUMNS = ["Epidural", "Intraparenchymal", "Intraventricular", "Subarachnoid", "Subdural"]
COLUMNS = ["PatientNumber", "SliceNumber", *SUBTYPE_COLUMNS, "No_Hemorrhage", "Fracture_Yes_No"]


def read_diagnosis(csv_path: Path) -> dict[int, dict[int, tuple[np.ndarray, int]]]:
    """patient -> 1-based slice -> (labels uint8 (6,) in CLASSES order, CSV row), checking every cell.

    ``any`` is set when No_Hemorrhage is 0 or a subtype is marked.
    """
    table: dict[int, dict[int, tuple[np.ndarray, int]]] = {}
    for i, row in enumerate(read_csv(csv_path, COLUMNS)):
        patient = csv_int(csv_path, i, "PatientNumber", row["PatientNumber"])
        number = csv_int(csv_path, i, "SliceNumber", row["SliceNumber"])
        if number < 1:
            raise InvalidInputError(
                f"{csv_path}: row {i + 2}, SliceNumber must be >= 1 (1-based), got {number}."
            )
        subtypes = [csv_int(csv_path, i, c, row[c], (0, 1)) for c in SUBTYPE_COLUMNS]
        none = csv_int(csv_path, i, "No_Hemorrhage", row["No_Hemorrhage"], (0, 1))
        csv_int(csv_path, i, "Fracture_Yes_No", row["Fracture_Yes_No"], (0, 1))
        if number in table.setdefault(patient, {}):
            raise InvalidInputError(f"{csv_path}: row {i + 2} repeats patient {patient}, slice {number}.")
        table[patient][number] = (np.array([int(none == 0 or any(subtypes)), *subtypes], np.uint8), i)
    return table


def volume_files(folder: Path) -> dict[int, Path]:
    """Patient number -> NIfTI file in ``folder`` (``NNN.nii`` or ``NNN.nii.gz``)."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith((".nii", ".nii.gz")):
            continue
        stem = path.name.split(".")[0]
        if not stem.isdigit():
            raise InvalidInputError(f"{path}: expected a patient number as file name (like 049.nii).")
        if int(stem) in found:
            raise InvalidInputError(f"{path}: patient {int(stem)} has two files ({found[int(stem)].name}).")
        found[int(stem)] = path
    return found


def load(root: Path, data) -> Source:
    """Check the CT-ICH layout under ``root`` and return a Source whose volumes load one at a time."""
    csv_path = root / CSV_NAME
    check_inside(root, [csv_path])
    table = read_diagnosis(csv_path)
    scans = volume_files(require_dir(root / "ct_scans", "CT-ICH keeps its CT volumes in ct_scans/"))
    masks = volume_files(require_dir(root / "masks", "CT-ICH keeps its masks in masks/"))
    check_inside(root, [*scans.values(), *masks.values()])

    if set(table) - set(scans):
        missing = sorted(set(table) - set(scans))
        raise InvalidInputError(
            f"{csv_path}: CSV rows of patients {missing} have no file in {root / 'ct_scans'}."
        )
    if set(scans) - set(table):
        extra = [scans[p].name for p in sorted(set(scans) - set(table))]
        raise InvalidInputError(f"{root / 'ct_scans'}: files {extra} have no rows in {csv_path}.")
    if set(scans) != set(masks):
        lost = [scans[p].name for p in sorted(set(scans) - set(masks))]
        stray = [masks[p].name for p in sorted(set(masks) - set(scans))]
        raise InvalidInputError(
            f"{root / 'masks'}: masks missing for {lost}, masks without a CT volume {stray}."
        )

    # Headers are cheap: check slice counts and orientation before any voxel is read.
    for patient, path in scans.items():
        header = nifti_header(path)
        axial = int(np.flatnonzero(nib.io_orientation(header.affine)[:, 0] == 2)[0])
        if len(header.shape) != 3 or axial != 2:
            raise InvalidInputError(
                f"{path}: expected a 3-D volume with axial slices along the third axis (SliceNumber indexes "
                f"it); got shape {header.shape} with the axial axis at position {axial + 1}."
            )
        have, want = set(table[patient]), set(range(1, header.shape[2] + 1))
        if have - want:
            raise InvalidInputError(
                f"{csv_path}: rows of patient {patient}, slices {sorted(have - want)[:10]}, have no slice in "
                f"{path} ({header.shape[2]} slices)."
            )
        if want - have:
            raise InvalidInputError(
                f"{path}: slices {sorted(want - have)[:10]} (1-based) have no row in {csv_path}."
            )

    provenance = {
        "files": {
            "ct_scans": len(scans),
            "masks": len(masks),
            "csv_rows": sum(len(t) for t in table.values()),
        },
        "label_mask_disagreements": 0,  # slices whose `any` label and mask disagree, filled while reading
    }

    def volumes() -> Iterator[Volume]:
        for patient in sorted(scans):
            ct, seg = read_axial(scans[patient]), read_axial(masks[patient])
            origin = f"{scans[patient]}"
            if seg.data.shape != ct.data.shape or not same_orientation(ct.affine, seg.affine):
                raise InvalidInputError(
                    f"{masks[patient]}: mask shape {seg.data.shape} or orientation does not match its CT "
                    "volume "
                    f"{scans[patient]} {ct.data.shape}."
                )
            mask = binary_mask(seg.data, str(masks[patient]))
            label = np.stack([table[patient][int(k) + 1][0] for k in ct.stored_index])
            provenance["label_mask_disagreements"] += int(
                ((mask.max(axis=(1, 2)) > 0) != (label[:, 0] > 0)).sum()
            )
            yield Volume(str(patient), origin, ct.data, label, mask, ct.spacing)

    return Source("ct-ich", root, list(CLASSES), ["any"], True, len(scans), volumes(), provenance)
