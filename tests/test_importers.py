"""Real formats, written small in tmp_path (nibabel, pydicom, Pillow, csv), imported through prepare.

Each layout is checked end to end (files -> dataset.h5), and every kind of bad input is checked for a
message that names the file and the problem, with no dataset.h5 left behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from weak2full import prepare
from weak2full.errors import InvalidInputError
from weak2full.h5 import DatasetFile
from weak2full.importers import CLASSES

# ---------------------------------------------------------------------------------------- writers

CT_ICH_COLUMNS = [
    "PatientNumber",
    "SliceNumber",
    "Intraventricular",
    "Intraparenchymal",
    "Subarachnoid",
    "Epidural",
    "Subdural",
    "No_Hemorrhage",
    "Fracture_Yes_No",
]
# Patient number -> which of its 4 slices bleed (three positive patients, two negative).
CT_ICH_PATIENTS = {49: [0, 1, 1, 0], 50: [0, 0, 1, 0], 58: [1, 0, 0, 0], 66: [0, 0, 0, 0], 67: [0, 0, 0, 0]}
X, Y = 20, 24  # stored in-plane size (not square: padding is exercised)


def ct_volume(flags, patient):
    """(X, Y, Z) int16 HU: air, a 30 HU head, a 4x4 bleed of 65 HU on flagged slices; slice z adds 10*z HU
    so that slice order can be read back. Mask (X, Y, Z) uint8 0/1."""
    z = len(flags)
    image = np.full((X, Y, z), -1000, np.int16)
    mask = np.zeros((X, Y, z), np.uint8)
    for k, flag in enumerate(flags):
        image[3:17, 3:21, k] = 30 + 10 * k + patient % 3
        if flag:  # away from the centre pixel that the tests read back
            mask[4:8, 4:8, k] = 1
            image[4:8, 4:8, k] = 65
    return image, mask


def write_ct_ich_csv(path: Path, patients: dict) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CT_ICH_COLUMNS)
        for p, flags in patients.items():
            for k, flag in enumerate(flags):
                # Bleeds are intraparenchymal; a fracture on the first slice of every patient.
                w.writerow([p, k + 1, 0, flag, 0, 0, 0, 1 - flag, int(k == 0)])


def write_ct_ich(root: Path, patients=CT_ICH_PATIENTS, z_spacing=5.0) -> Path:
    """The PhysioNet layout; a negative ``z_spacing`` stores slices superior to inferior."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    affine = np.diag([0.5, 0.5, z_spacing, 1.0])
    for p, flags in patients.items():
        image, mask = ct_volume(flags, p)
        nib.save(nib.Nifti1Image(image, affine), root / "ct_scans" / f"{p:03d}.nii")
        nib.save(nib.Nifti1Image(mask, affine), root / "masks" / f"{p:03d}.nii")
    write_ct_ich_csv(root / "hemorrhage_diagnosis_raw_ct.csv", patients)
    return root


def write_ct_ich_png(root: Path, patients=CT_ICH_PATIENTS) -> Path:
    """The PNG export: brain window 40/120, masks 0/255, file name = CSV data row."""
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    row = 0
    for p, flags in patients.items():
        image, mask = ct_volume(flags, p)
        for k in range(len(flags)):
            png = np.clip((image[:, :, k] - (40 - 60)) * 255.0 / 120.0, 0, 255).round().astype(np.uint8)
            Image.fromarray(png).save(root / "image" / f"{row}.png")
            Image.fromarray((mask[:, :, k] * 255).astype(np.uint8)).save(root / "label" / f"{row}.png")
            row += 1
    write_ct_ich_csv(root / "hemorrhage_diagnosis_raw_ct.csv", patients)
    return root


UID = "1.2.826.0.1.3680043.8.498."


def write_dicom(
    path: Path, stored: np.ndarray, *, patient: str, series: str, z: float, bits_stored=16, intercept=-1024.0
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID + str(int(path.stem[3:], 16))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.SeriesInstanceUID = patient, series
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelSpacing = [0.8, 0.7]
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


# Series: (patient, positive flags in z order). PID2 has two series; PID4's second slice uses the 12-bit fix.
RSNA_SERIES = {
    "S1": ("PID1", [0, 1, 1]),
    "S2": ("PID2", [0, 1, 0]),
    "S3": ("PID2", [0, 0, 0]),
    "S4": ("PID3", [1, 0, 0]),
    "S5": ("PID4", [0, 0, 0]),
    "S6": ("PID5", [0, 0, 0]),
}


def write_rsna(root: Path, series=RSNA_SERIES) -> Path:
    """DICOMs in stage_2_train/ with file names out of z order, and stage_2_train.csv (subdural bleeds)."""
    (root / "stage_2_train").mkdir(parents=True)
    rows = []
    n = 0
    for uid, (patient, flags) in series.items():
        for k, flag in reversed(list(enumerate(flags))):  # file ids increase while z decreases
            image_id = f"ID_{n:06x}a"
            n += 1
            hu = np.full((16, 12), -1000.0)
            hu[2:14, 2:10] = 30 + 10 * k
            if (
                uid == "S5" and k == 1
            ):  # a 12-bit image that needs the fix: HU = (stored + 1000) mod 4096 - 1000
                write_dicom(
                    root / "stage_2_train" / f"{image_id}.dcm",
                    np.mod(hu, 4096),
                    patient=patient,
                    series=UID + uid[1:],
                    z=10.0 * k,
                    bits_stored=12,
                    intercept=0.0,
                )
            else:
                write_dicom(
                    root / "stage_2_train" / f"{image_id}.dcm",
                    hu + 1024,
                    patient=patient,
                    series=UID + uid[1:],
                    z=10.0 * k,
                )
            for sub in CLASSES:
                rows.append((f"{image_id}_{sub}", int(flag and sub in ("any", "subdural"))))
    with open(root / "stage_2_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Label"])
        w.writerows(rows)
    return root


def write_nifti_cases(root: Path, n=4, layout="cases", values=(1,)) -> Path:
    """n cases of (X, Y, 5) float MRI-like volumes; case i > 0 has its lesions on slice i, case 0 none."""
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(n):
        image = np.zeros((X, Y, 5), np.float32)
        image[3:17, 3:21] = 200.0 + np.arange(5) * 10
        mask = np.zeros((X, Y, 5), np.uint8)
        if i > 0:
            for j, v in enumerate(values):
                mask[5 + 4 * j : 8 + 4 * j, 8:12, i] = v
                image[5 + 4 * j : 8 + 4 * j, 8:12, i] = 600.0
        if layout == "cases":
            (root / f"case{i}").mkdir()
            nib.save(nib.Nifti1Image(image, affine), root / f"case{i}" / "FLAIR.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), root / f"case{i}" / "mask.nii.gz")
        else:
            (root / "images").mkdir(exist_ok=True)
            (root / "masks").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case{i}.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), root / "masks" / f"case{i}.nii.gz")
    return root


def prepared(make_params, tmp_path, source, path, **data) -> DatasetFile:
    out = tmp_path / "out" / "dataset.h5"
    brain = {"brain_mask": data.get("intensity", "hu") == "hu"}  # the skull mask needs HU
    section = {"source": source, "path": str(path), "image_size": 32, **data}
    prepare.run(make_params(data=section, input=brain), out, None)
    return DatasetFile(out)


def refuses(make_params, tmp_path, source, path, match, **data) -> None:
    """prepare raises InvalidInputError matching ``match`` and leaves nothing in the output folder."""
    out = tmp_path / "out" / "dataset.h5"
    with pytest.raises(InvalidInputError, match=match):
        prepare.run(
            make_params(data={"source": source, "path": str(path), "image_size": 32, **data}),
            out,
            tmp_path / "out" / "montage.png",
        )
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ------------------------------------------------------------------------------------------ ct-ich


def test_ct_ich_import(make_params, tmp_path):
    root = write_ct_ich(tmp_path / "ct-ich")
    d = prepared(make_params, tmp_path, "ct-ich", root)
    assert d.n == 20 and (d.height, d.width) == (32, 32)
    assert d.classes == CLASSES and d.mask_classes == ["any"] and d.masks_complete
    # Labels follow the CSV, in slice order, and agree with the masks here.
    flags = np.concatenate([CT_ICH_PATIENTS[p] for p in sorted(CT_ICH_PATIENTS)])
    np.testing.assert_array_equal(d.label[:, 0], flags)
    np.testing.assert_array_equal(d.label[:, CLASSES.index("intraparenchymal")], flags)
    np.testing.assert_array_equal(d.all_masks(slice(None)).max(axis=(1, 2)), flags)
    # 24 stored pixels padded to a square of 24 and resampled to 32: spacing 0.5 * 24 / 32.
    assert d.pixel_spacing == pytest.approx([0.375, 0.375])
    image = d.images(slice(0, 4))
    assert image.min() == -1000 and (image[:, 16, 16] == [30 + 10 * k + 49 % 3 for k in range(4)]).all()
    prov = json.loads(d.h5.attrs["provenance"])
    assert (
        prov["files"] == {"ct_scans": 5, "masks": 5, "csv_rows": 20} and prov["label_mask_disagreements"] == 0
    )


def test_ct_ich_flipped_z_keeps_labels_on_their_slices(make_params, tmp_path):
    root = write_ct_ich(tmp_path / "ct-ich", z_spacing=-5.0)
    d = prepared(make_params, tmp_path, "ct-ich", root)
    # Stored superior to inferior: the dataset reverses each volume, labels travel with their slices.
    flags = np.concatenate([CT_ICH_PATIENTS[p][::-1] for p in sorted(CT_ICH_PATIENTS)])
    np.testing.assert_array_equal(d.label[:, 0], flags)
    np.testing.assert_array_equal(d.all_masks(slice(None)).max(axis=(1, 2)), flags)
    assert (d.images(slice(0, 4))[:, 16, 16] == [30 + 10 * k + 1 for k in (3, 2, 1, 0)]).all()


def test_ct_ich_bad_inputs(make_params, tmp_path):
    root = write_ct_ich(tmp_path / "ct-ich")
    refuses(make_params, tmp_path, "ct-ich", tmp_path / "nowhere", r"nowhere does not exist")

    (root / "ct_scans" / "068.nii").write_bytes((root / "ct_scans" / "067.nii").read_bytes())
    refuses(
        make_params,
        tmp_path,
        "ct-ich",
        root,
        r"068\.nii'\] have no rows in .*hemorrhage_diagnosis_raw_ct\.csv",
    )
    (root / "ct_scans" / "068.nii").unlink()

    (root / "ct_scans" / "067.nii").rename(tmp_path / "067.nii")
    refuses(make_params, tmp_path, "ct-ich", root, r"rows of patients \[67\] have no file")
    (tmp_path / "067.nii").rename(root / "ct_scans" / "067.nii")

    image, mask = ct_volume([0, 0, 0, 0], 66)
    nib.save(nib.Nifti1Image(image[:, :, :3], np.diag([0.5, 0.5, 5, 1])), root / "ct_scans" / "066.nii")
    nib.save(nib.Nifti1Image(mask[:, :, :3], np.diag([0.5, 0.5, 5, 1])), root / "masks" / "066.nii")
    refuses(make_params, tmp_path, "ct-ich", root, r"patient 66, slices \[4\], have no slice in .*066\.nii")

    nib.save(nib.Nifti1Image(image, np.diag([0.5, 0.5, 5, 1])), root / "ct_scans" / "066.nii")
    nib.save(nib.Nifti1Image(mask[:-1], np.diag([0.5, 0.5, 5, 1])), root / "masks" / "066.nii")
    refuses(make_params, tmp_path, "ct-ich", root, r"masks/066\.nii: mask shape .* does not match")

    bad = mask.copy()
    bad[0, 0, 0], bad[1, 1, 1] = 2, 1
    nib.save(nib.Nifti1Image(bad, np.diag([0.5, 0.5, 5, 1])), root / "masks" / "066.nii")
    refuses(
        make_params,
        tmp_path,
        "ct-ich",
        root,
        r"066\.nii: mask values \[0, 1, 2\] are outside the class range",
    )
    nib.save(nib.Nifti1Image(mask, np.diag([0.5, 0.5, 5, 1])), root / "masks" / "066.nii")

    nan = image.astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([0.5, 0.5, 5, 1])), root / "ct_scans" / "066.nii")
    refuses(make_params, tmp_path, "ct-ich", root, r"066\.nii: 1 voxels are NaN or infinite")
    nib.save(nib.Nifti1Image(image, np.diag([0.5, 0.5, 5, 1])), root / "ct_scans" / "066.nii")

    (root / "ct_scans" / "066.nii").write_bytes(b"not a nifti")
    refuses(make_params, tmp_path, "ct-ich", root, r"066\.nii: not a readable NIfTI file")


def test_ct_ich_csv_problems(make_params, tmp_path):
    root = write_ct_ich(tmp_path / "ct-ich")
    csv_path = root / "hemorrhage_diagnosis_raw_ct.csv"
    good = csv_path.read_text()
    # A name from the CSV cannot point outside data.path: patient numbers must be integers.
    csv_path.write_text(good.replace("\n49,1,", "\n../49,1,", 1))
    refuses(
        make_params,
        tmp_path,
        "ct-ich",
        root,
        r"row 2, column PatientNumber must be an integer, got '\.\./49'",
    )
    csv_path.write_text(good.replace("Fracture_Yes_No", "Fracture"))
    refuses(make_params, tmp_path, "ct-ich", root, r"missing columns \['Fracture_Yes_No'\]")
    csv_path.write_text(good.replace("\n49,1,0,0,0,0,0,1,", "\n49,1,0,0,0,0,0,7,", 1))
    refuses(
        make_params, tmp_path, "ct-ich", root, r"row 2, column No_Hemorrhage must be one of \[0, 1\], got '7'"
    )
    csv_path.unlink()
    refuses(make_params, tmp_path, "ct-ich", root, r"hemorrhage_diagnosis_raw_ct\.csv: file not found")


def test_split_needs_positive_patients(make_params, tmp_path):
    patients = {49: [0, 1], 50: [0, 0], 51: [1, 0], 52: [0, 0], 53: [0, 0]}
    root = write_ct_ich(tmp_path / "ct-ich", patients=patients)
    refuses(
        make_params,
        tmp_path,
        "ct-ich",
        root,
        r"only 2 patients have a positive slice, so a split would get no positive patient",
    )


def test_wrong_layout_for_source(make_params, tmp_path):
    root = write_nifti_cases(tmp_path / "mri")
    refuses(make_params, tmp_path, "ct-ich", root, r"hemorrhage_diagnosis_raw_ct\.csv: file not found")
    refuses(make_params, tmp_path, "rsna", root, r"stage_2_train\.csv: file not found")
    write_ct_ich_csv(root / "hemorrhage_diagnosis_raw_ct.csv", CT_ICH_PATIENTS)
    refuses(
        make_params, tmp_path, "ct-ich-png", root, r"image: folder not found; the CT-ICH PNG export keeps"
    )


# -------------------------------------------------------------------------------------- ct-ich-png


def test_ct_ich_png_import(make_params, tmp_path):
    root = write_ct_ich_png(tmp_path / "png")
    d = prepared(make_params, tmp_path, "ct-ich-png", root)
    flags = np.concatenate([CT_ICH_PATIENTS[p] for p in sorted(CT_ICH_PATIENTS)])
    np.testing.assert_array_equal(d.label[:, 0], flags)
    np.testing.assert_array_equal(d.all_masks(slice(None)).max(axis=(1, 2)), flags)
    assert d.pixel_spacing is None and d.mask_classes == ["any"]
    image = d.images(slice(0, 4))
    # The 40/120 window inverts to HU within a grey level (0.47 HU); air clips to -20 HU.
    assert image.min() == -20
    assert np.abs(image[:, 16, 16] - [30 + 10 * k + 1 for k in range(4)]).max() <= 1


def test_ct_ich_png_bad_inputs(make_params, tmp_path):
    root = write_ct_ich_png(tmp_path / "png")
    (root / "image" / "19.png").unlink()
    refuses(
        make_params, tmp_path, "ct-ich-png", root, r"rows \[19\] \(0-based\) have no file image/<row>\.png"
    )
    Image.fromarray(np.zeros((X, Y), np.uint8)).save(root / "image" / "19.png")
    Image.fromarray(np.zeros((X, Y), np.uint8)).save(root / "label" / "20.png")
    refuses(make_params, tmp_path, "ct-ich-png", root, r"label: files \['20\.png'\] have no row in")
    (root / "label" / "20.png").unlink()
    Image.fromarray(np.zeros((X, Y - 2), np.uint8)).save(root / "label" / "19.png")
    refuses(make_params, tmp_path, "ct-ich-png", root, r"label/19\.png: shape \(20, 22\) does not match")
    Image.fromarray(np.full((X, Y), 128, np.uint8)).save(root / "label" / "19.png")
    refuses(
        make_params,
        tmp_path,
        "ct-ich-png",
        root,
        r"label/19\.png: mask values \[128\] are outside the class range",
    )


# -------------------------------------------------------------------------------------------- rsna


def test_rsna_import(make_params, tmp_path):
    root = write_rsna(tmp_path / "rsna")
    d = prepared(make_params, tmp_path, "rsna", root)
    assert d.n == 18 and d.classes == CLASSES and not d.masks_complete
    assert not d.has_mask.any() and not d.all_masks(slice(None)).any()
    # Six series become six volumes sorted by z; PID2's two series share a split.
    expect = np.concatenate([flags for _, flags in RSNA_SERIES.values()])
    np.testing.assert_array_equal(d.label[:, 0], expect)
    np.testing.assert_array_equal(d.label[:, CLASSES.index("subdural")], expect)
    assert (d.label[:, CLASSES.index("epidural")] == 0).all()
    np.testing.assert_array_equal(d.slice, np.tile(np.arange(3), 6))
    assert d.split[d.patient == 1][0] == d.split[d.patient == 2][0]
    # HU in z order, the 12-bit fix included (series S5, volume 4, slice 1).
    centre = d.images(slice(None))[:, 8, 8].reshape(6, 3)
    np.testing.assert_array_equal(centre, np.tile([30, 40, 50], (6, 1)))
    # Spacing (0.8, 0.7) of 16 x 12 pixels, padded to 16 and resampled to 32.
    assert d.pixel_spacing == pytest.approx([0.4, 0.35])
    assert json.loads(d.h5.attrs["provenance"])["unreadable"] == {}


def test_rsna_unreadable_files(make_params, tmp_path):
    root = write_rsna(tmp_path / "rsna")
    bad = root / "stage_2_train" / "ID_000000a.dcm"
    bad.write_bytes(b"garbage")
    refuses(
        make_params,
        tmp_path,
        "rsna",
        root,
        r"1 of 18 DICOM files \(5\.6%\) are unreadable, above "
        r"data\.max_unreadable_fraction=0\.01: ID_000000a\.dcm",
    )
    d = prepared(make_params, tmp_path, "rsna", root, max_unreadable_fraction=0.1)
    assert d.n == 17 and list(json.loads(d.h5.attrs["provenance"])["unreadable"]) == ["ID_000000a.dcm"]


def test_rsna_bad_inputs(make_params, tmp_path):
    root = write_rsna(tmp_path / "rsna")
    csv_path = root / "stage_2_train.csv"
    good = csv_path.read_text()
    csv_path.write_text(good.replace("ID_000000a_any", "ID_../../etc_any"))
    refuses(
        make_params, tmp_path, "rsna", root, r"row 2, ID 'ID_\.\./\.\./etc_any' is not ID_<image>_<subtype>"
    )
    csv_path.write_text(
        "".join(line for line in good.splitlines(True) if not line.startswith("ID_000000a_subdural"))
    )
    refuses(
        make_params, tmp_path, "rsna", root, r"images \['ID_000000a'\] lack rows for some of the subtypes"
    )
    csv_path.write_text(good + "".join(f"ID_ffffffa_{s},0\n" for s in CLASSES))
    refuses(
        make_params,
        tmp_path,
        "rsna",
        root,
        r"rows of 1 images have no ID_<image>\.dcm file .*\['ID_ffffffa'\]",
    )
    csv_path.write_text(good)
    (root / "ID_eeeeeea.dcm").write_bytes((root / "stage_2_train" / "ID_000000a.dcm").read_bytes())
    refuses(make_params, tmp_path, "rsna", root, r"1 DICOM files have no rows in .*\['ID_eeeeeea\.dcm'\]")
    (root / "ID_eeeeeea.dcm").unlink()
    # Every file unreadable and allowed to be: nothing is left to import.
    for path in (root / "stage_2_train").glob("*.dcm"):
        path.write_bytes(b"garbage")
    refuses(make_params, tmp_path, "rsna", root, r"the dataset is empty", max_unreadable_fraction=1.0)


# ------------------------------------------------------------------------------------ nifti-folder


@pytest.mark.parametrize("layout", ["cases", "folders"])
def test_nifti_folder_import(make_params, tmp_path, layout):
    root = write_nifti_cases(tmp_path / "nifti", layout=layout)
    d = prepared(make_params, tmp_path, "nifti-folder", root)
    assert d.classes == ["any"] and d.mask_classes == ["any"] and d.n == 20
    expect = np.zeros((4, 5), np.uint8)
    expect[[1, 2, 3], [1, 2, 3]] = 1
    np.testing.assert_array_equal(d.label[:, 0], expect.ravel())
    assert d.pixel_spacing == pytest.approx([0.75, 0.75])
    assert d.images(slice(0, 5))[:, 16, 16].tolist() == [200, 210, 220, 230, 240]  # "hu" keeps values


def test_nifti_folder_multiclass_and_percentile(make_params, tmp_path):
    root = write_nifti_cases(tmp_path / "nifti", values=(1, 3))
    d = prepared(make_params, tmp_path, "nifti-folder", root, intensity="percentile")
    assert d.mask_classes == ["label_1", "label_2", "label_3"] and d.classes == [
        "any",
        "label_1",
        "label_2",
        "label_3",
    ]
    assert d.label[:, 1].sum() == 3 and d.label[:, 2].sum() == 0 and d.label[:, 3].sum() == 3
    # Case 0 (no lesion): its non-zero voxels run 200..240 HU over the slices, mapped to 0..1000.
    assert d.images(slice(0, 5))[:, 16, 16].tolist() == [0, 250, 500, 750, 1000]


def test_nifti_folder_bad_inputs(make_params, tmp_path):
    root = write_nifti_cases(tmp_path / "nifti")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((X, Y, 5), np.float32), affine), root / "case1" / "T1.nii.gz")
    refuses(
        make_params, tmp_path, "nifti-folder", root, r"case1: expected one image and one mask\.nii\(\.gz\)"
    )
    (root / "case1" / "T1.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.full((X, Y, 5), 0.5, np.float32), affine), root / "case1" / "mask.nii.gz")
    refuses(
        make_params, tmp_path, "nifti-folder", root, r"case1/mask\.nii\.gz: mask values must be whole numbers"
    )
    nib.save(nib.Nifti1Image(np.zeros((X, Y, 4), np.uint8), affine), root / "case1" / "mask.nii.gz")
    refuses(
        make_params,
        tmp_path,
        "nifti-folder",
        root,
        r"case1/mask\.nii\.gz: mask shape .* does not match its image",
    )
    big = np.full((X, Y, 5), 1e6, np.float32)
    nib.save(nib.Nifti1Image(np.zeros((X, Y, 5), np.uint8), affine), root / "case1" / "mask.nii.gz")
    nib.save(nib.Nifti1Image(big, affine), root / "case1" / "FLAIR.nii.gz")
    refuses(
        make_params,
        tmp_path,
        "nifti-folder",
        root,
        r"FLAIR\.nii\.gz: values .* do not fit int16 HU; for MRI set data\.intensity: percentile",
    )
    empty = tmp_path / "empty"
    (empty / "case0").mkdir(parents=True)
    refuses(make_params, tmp_path, "nifti-folder", empty, r"empty: no NIfTI volumes found")


def test_nifti_folder_on_real_mri(make_params, tmp_path, open_ms_data):
    d = prepared(make_params, tmp_path, "nifti-folder", open_ms_data, intensity="percentile")
    assert d.classes == ["any"] and d.mask_classes == ["any"] and d.masks_complete
    # MNI space: 182 axial slices of 182 x 218 at 1 mm, padded to 218 and resampled to 32.
    assert d.n == 3 * 182 and d.pixel_spacing == pytest.approx([218 / 32, 218 / 32])
    # Slices with lesion per patient, as the README counts them at full resolution.
    assert [int(d.label[d.patient == p, 0].sum()) for p in range(3)] == [74, 87, 54]
    # Three positive patients: one each in train, val and test; val and test annotated.
    assert sorted(int(d.split[d.patient == p][0]) for p in range(3)) == [0, 1, 2]
    assert (d.has_mask == (d.split > 0)).all()
    prov = json.loads(d.h5.attrs["provenance"])
    assert (
        prov["volume_patient"] == ["patient07", "patient19", "patient26"]
        and prov["intensity"] == "percentile"
    )
