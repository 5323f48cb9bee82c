"""The DenseCRF2D wrapper: known answers on hand-made probabilities and images."""

import numpy as np
import pytest

from weak2full.crf import refine, window_u8
from weak2full.errors import InvalidInputError
from weak2full.params import CRFParams

SIZE = 24


def _blurry_square():
    """Probabilities of a blurry 'square' (soft edges 3 px wide) and an image whose square is sharp."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (abs(yy - 12) <= 5) & (abs(xx - 12) <= 5)
    dist = np.maximum(abs(yy - 12), abs(xx - 12)).astype(np.float32)
    p = np.clip(1.0 - (dist - 4.5) / 6.0, 0.05, 0.95)  # 0.5 at distance 7.5: overshoots the edge (5)
    prob = np.stack([1.0 - p, p]).astype(np.float32)
    image = np.where(inside, 200, 60).astype(np.uint8)
    return prob, image, inside


def test_without_pairwise_terms_the_posterior_is_the_input():
    prob, image, _ = _blurry_square()
    p = CRFParams(gaussian_compat=0.0, compat=0.0)
    q = refine(prob, image, p)
    assert q.shape == prob.shape and q.dtype == np.float32
    np.testing.assert_allclose(q, prob, atol=1e-5)


def test_the_bilateral_kernel_snaps_a_blurry_map_to_the_image_edge():
    prob, image, inside = _blurry_square()
    p = CRFParams(compat=10.0, bilateral_srgb=20.0, bilateral_sxy=5.0, iterations=10)
    q = refine(prob, image, p)
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
    before = (prob.argmax(0) == 1) != inside
    after = (q.argmax(0) == 1) != inside
    assert before.sum() > 0 and after.sum() == 0


def test_grey_srgb_is_in_grey_levels():
    # A grey slice must act like a colour image whose other two channels are constant.
    prob, image, _ = _blurry_square()
    p = CRFParams(compat=10.0)
    rgb = np.stack([image, np.zeros_like(image), np.zeros_like(image)], axis=-1)
    grey, colour = refine(prob, image, p), refine(prob, rgb, p)
    # The permutohedral lattice differs with the feature count (3 vs 5): equal up to its approximation.
    np.testing.assert_allclose(grey, colour, atol=1e-3)
    assert np.array_equal(grey.argmax(0), colour.argmax(0))


def test_refine_is_deterministic():
    prob, image, _ = _blurry_square()
    p = CRFParams()
    assert refine(prob, image, p).tobytes() == refine(prob, image, p).tobytes()


def test_window_u8_maps_the_window_to_0_255():
    hu = np.array([[-100, 0, 40, 80, 1000]], np.int16)
    assert window_u8(hu, (40.0, 80.0)).tolist() == [[0, 0, 128, 255, 255]]


@pytest.mark.parametrize(
    "prob_shape, image, message",
    [
        ((1, SIZE, SIZE), np.zeros((SIZE, SIZE), np.uint8), "L >= 2"),
        ((2, SIZE, SIZE), np.zeros((SIZE, SIZE + 1), np.uint8), "CRF image must be uint8"),
        ((2, SIZE, SIZE), np.zeros((SIZE, SIZE), np.float32), "CRF image must be uint8"),
    ],
)
def test_bad_shapes_are_refused(prob_shape, image, message):
    with pytest.raises(InvalidInputError, match=message):
        refine(np.full(prob_shape, 0.5, np.float32), image, CRFParams())
