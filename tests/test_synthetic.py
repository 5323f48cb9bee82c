"""The synthetic head-CT generator: contract, determinism, CT physics and CT-ICH statistics."""

import numpy as np
import pytest
from scipy import ndimage

from weak2full.errors import InvalidParameterError
from weak2full.params import SyntheticParams, parse_params
from weak2full.synthetic import CLASSES, FOV_MM, MASK_CLASSES, generate, summary_statistics

TINY = SyntheticParams(patients=4, slices_per_patient=10, positive_patient_fraction=0.75)


@pytest.fixture(scope="module")
def tiny():
    return generate(TINY, 64, seed=3)


@pytest.fixture(scope="module")
def cohort():
    """Default params at the default 128 px, 40 patients instead of 60 (runtime): 1,280 slices."""
    return generate(SyntheticParams(patients=40), 128, seed=0)


@pytest.fixture(scope="module")
def stats(cohort):
    return summary_statistics(cohort)


def _skull(image):
    """Bone (> 300 HU) and the cranial cavity it encloses (holes of the closed bone ring), per slice."""
    bone = image > 300
    closed = np.stack([ndimage.binary_closing(b, iterations=2) for b in bone])
    inside = np.stack([ndimage.binary_fill_holes(c) for c in closed]) & ~closed
    return bone, inside


# ------------------------------------------------------------------------------------------ contract


def test_contract(tiny):
    n = 4 * 10
    assert tiny.image.shape == tiny.mask.shape == (n, 64, 64)
    assert tiny.image.dtype == np.int16 and tiny.mask.dtype == np.uint8
    assert tiny.label.shape == (n, 6) and tiny.label.dtype == np.uint8
    assert tiny.patient.dtype == tiny.slice.dtype == np.int32 and tiny.fracture.dtype == bool
    assert CLASSES == ["any"] + MASK_CLASSES
    assert MASK_CLASSES == ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    assert tiny.patient.tolist() == np.repeat(np.arange(4), 10).tolist()  # contiguous patients
    assert tiny.slice.tolist() == np.tile(np.arange(10), 4).tolist()  # skull base -> vertex
    assert tiny.pixel_spacing == pytest.approx((FOV_MM / 64, FOV_MM / 64))
    assert int(tiny.mask.max()) <= 5


def test_labels_are_mask_non_empty_per_class(tiny, cohort):
    for d in (tiny, cohort):
        for k in range(1, 6):
            assert (d.label[:, k] == (d.mask == k).any(axis=(1, 2))).all(), MASK_CLASSES[k - 1]
        assert (d.label[:, 0] == (d.mask > 0).any(axis=(1, 2))).all()
    assert cohort.label[:, 1:].any(axis=0).all()  # every subtype occurs in a default-sized cohort


def test_pixel_spacing_keeps_the_head_size():
    """At any image_size the head is ~180 x 150 mm (AP x LR) at its widest level."""
    for size in (64, 128):
        d = generate(SyntheticParams(patients=3, slices_per_patient=12), size, seed=1)
        mid = d.image[d.slice == 5] > -500
        ap = mid.any(axis=2).sum(axis=1) * d.pixel_spacing[0]
        lr = mid.any(axis=1).sum(axis=1) * d.pixel_spacing[1]
        assert 160 < np.median(ap) < 205 and 130 < np.median(lr) < 170, (size, ap, lr)


def test_same_seed_same_bytes_and_different_seeds_differ(tiny):
    again = generate(TINY, 64, seed=3)
    for name in ("image", "mask", "label", "patient", "slice", "fracture"):
        assert getattr(again, name).tobytes() == getattr(tiny, name).tobytes(), name
    other = generate(TINY, 64, seed=4)
    assert other.image.tobytes() != tiny.image.tobytes()


def test_bad_parameters_name_the_key():
    with pytest.raises(InvalidParameterError, match=r"'data\.synthetic\.subtype_weights'.*5 non-negative"):
        parse_params({"data": {"synthetic": {"subtype_weights": [1.0, 1.0]}}})
    with pytest.raises(InvalidParameterError, match=r"'data\.synthetic\.blood_hu'.*low < high"):
        parse_params({"data": {"synthetic": {"blood_hu": [70.0, 50.0]}}})
    with pytest.raises(InvalidParameterError, match="image_size must be >= 32"):
        generate(TINY, 16, seed=0)


# ------------------------------------------------------------------------------------------- physics


def test_ct_densities(cohort):
    img = cohort.image
    assert (img[:, :3, :3] < -900).all()  # air in the corners
    bone, inside = _skull(img)
    # Every slice has a skull whose cortical tables reach 1000-1800 HU, and diploe below that.
    top = np.array([np.percentile(i[b], 95) for i, b in zip(img, bone)])
    assert ((top > 1000) & (top < 1900)).all()
    diploe = np.mean([((i > 300) & (i < 900))[b].mean() for i, b in zip(img, bone)])
    assert diploe > 0.05
    # Brain at mid levels, away from blood: grey/white ~25-40 HU, CSF 0-15 HU present.
    mid = (cohort.slice >= 12) & (cohort.slice <= 22) & (cohort.label[:, 0] == 0)
    tissue = np.concatenate([i[m & (i > -50) & (i < 100)] for i, m in zip(img[mid], inside[mid])])
    assert 26 < np.median(tissue) < 40
    assert 0.03 < np.mean((tissue >= 0) & (tissue <= 15)) < 0.3


def test_hyperdense_mimics_on_negative_slices(cohort):
    """Calcifications (100-400 HU) inside the cranial cavity, away from bone, on slices without blood."""
    neg = (cohort.label[:, 0] == 0) & (cohort.slice >= 12) & (cohort.slice <= 20)
    bone, inside = _skull(cohort.image[neg])
    far = np.stack([ndimage.distance_transform_edt(~b) for b in bone]) > 4
    calcified = ((cohort.image[neg] >= 100) & (cohort.image[neg] <= 450) & inside & far).any(axis=(1, 2))
    assert 0.1 < calcified.mean() < 0.9


def test_blood_is_acute_and_inside_the_skull(cohort):
    pos = cohort.label[:, 0] > 0
    img, m = cohort.image[pos], cohort.mask[pos] > 0
    blood = np.array([i[k].mean() for i, k in zip(img, m)])
    assert (blood > 25).all() and (blood < 100).all()
    assert 45 < np.median(blood) < 65
    bone, inside = _skull(img)
    assert not (m & bone).any()  # no labelled pixel is bone
    assert (m & inside).sum() / m.sum() > 0.97  # (a fracture gap can open the ring on a few)


def test_subtypes_keep_their_places(cohort):
    """Epidural/subdural bleeds lie against the skull, parenchymal ones deeper in the brain."""
    dist = {}
    for k in (1, 2, 5):
        rows = np.flatnonzero(cohort.label[:, k])
        d = []
        for i in rows:
            to_bone = ndimage.distance_transform_edt(cohort.image[i] <= 300) * cohort.pixel_spacing[0]
            d.append(np.median(to_bone[cohort.mask[i] == k]))
        dist[MASK_CLASSES[k - 1]] = np.median(d)
    assert dist["epidural"] < 6 and dist["subdural"] < 6
    assert dist["intraparenchymal"] > 12


# ---------------------------------------------------------------------------------------- statistics


def test_prevalence_matches_ct_ich(stats):
    assert 0.07 < stats["positive_slices"] < 0.16  # real 0.11
    assert 0.4 < stats["positive_patients"] < 0.56  # real 0.48
    assert 3 <= stats["span"][1] <= 9  # real median 6 consecutive slices


def test_lesions_are_small_and_low_contrast(stats):
    p10, _, p50, _, p90 = stats["area_pct"]  # real 0.10 / 0.42 / 1.6 % of the slice
    assert 0.03 < p10 < 0.2 and 0.25 < p50 < 0.7 and 0.8 < p90 < 2.5
    assert stats["components"][0] == 1 and stats["components"][1] <= 3
    c10, c50, c90 = stats["contrast_hu"]  # real 6 / 17 / 30 HU
    assert 0 < c10 < 15 and 10 < c50 < 26 and c90 < 40


def test_shortcuts_like_real_ct(stats):
    fifths = stats["level_fifths"]  # real 0.3%, 10%, 26%, 19%, 3%
    assert max(fifths[2], fifths[3]) == max(fifths)  # the peak is in the middle
    assert fifths[0] < 0.03 and fifths[4] < fifths[2]
    assert 0.2 < stats["fracture_pos"] < 0.6  # real 38% of positive slices
    assert stats["fracture_neg"] < 0.08  # real 3% of negative slices
    assert stats["fracture_pos"] > 4 * stats["fracture_neg"]


def test_texture_like_brain(stats):
    assert 1.5 < stats["texture_hu"] < 5.0  # real ~3 HU in 5x5 windows
