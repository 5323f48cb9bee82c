"""Dense CRF refinement (pydensecrf's DenseCRF2D), every knob a parameter of :class:`CRFParams`.

The fully connected CRF of Krähenbühl & Koltun: a unary from per-pixel class probabilities, a Gaussian
(smoothness) kernel over pixel positions and a bilateral (appearance) kernel over positions and
intensities of the windowed CT slice, then mean-field inference. Deterministic: the same inputs give the
same posterior, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import create_pairwise_bilateral, unary_from_softmax

from weak2full.data import window
from weak2full.errors import InvalidInputError
from weak2full.params import CRFParams

__all__ = ["refine", "window_u8"]


def window_u8(hu: np.ndarray, win: tuple[float, float]) -> np.ndarray:
    """HU slice (H, W) -> uint8 (H, W) in the window ``(level, width)``: the bilateral kernel's image."""
    return np.round(window(hu, *win) * 255.0).astype(np.uint8)


def refine(prob: np.ndarray, image_u8: np.ndarray, p: CRFParams) -> np.ndarray:
    """Run the dense CRF and return its posterior.

    Args:
        prob: float32 (L, H, W) class probabilities, L >= 2 (label 0 is usually background); each
            pixel's column should sum to 1. Clipped below at ``p.unary_clip`` before the log.
        image_u8: the windowed slice, uint8 (H, W) or (H, W, 3) (see :func:`window_u8`).
        p: kernel widths, weights, iteration count (``pseudo_masks.crf`` in params.yaml).

    Returns:
        float32 (L, H, W) posterior (mean-field marginals); ``argmax(axis=0)`` is the CRF's labelling.

    The bilateral kernel is that of ``DenseCRF2D.addPairwiseBilateral(sxy, srgb, rgbim, compat)``; a
    single-channel slice goes through the same kernel built by ``create_pairwise_bilateral`` with one
    intensity feature, so ``bilateral_srgb`` is in grey levels of the window (replicating a grey slice
    into three channels would silently divide it by sqrt(3)).
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3 or prob.shape[0] < 2:
        raise InvalidInputError(f"CRF probabilities must be (L, H, W) with L >= 2, got shape {prob.shape}.")
    n_labels, h, w = prob.shape
    if image_u8.dtype != np.uint8 or image_u8.shape[:2] != (h, w) or image_u8.ndim not in (2, 3):
        raise InvalidInputError(
            f"CRF image must be uint8 (H, W) or (H, W, 3) with H, W = {(h, w)}, "
            f"got {image_u8.dtype} {image_u8.shape}."
        )
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob, clip=p.unary_clip)))
    crf.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    if image_u8.ndim == 3:
        crf.addPairwiseBilateral(
            sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(image_u8), compat=p.compat
        )
    else:
        feats = create_pairwise_bilateral(
            sdims=(p.bilateral_sxy, p.bilateral_sxy), schan=(p.bilateral_srgb,), img=image_u8, chdim=-1
        )
        crf.addPairwiseEnergy(
            np.ascontiguousarray(feats),
            compat=p.compat,
            kernel=dcrf.DIAG_KERNEL,
            normalization=dcrf.NORMALIZE_SYMMETRIC,
        )
    q = crf.inference(p.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)
