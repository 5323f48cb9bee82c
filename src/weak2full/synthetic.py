"""A synthetic head-CT generator with free pixel masks, tuned to behave like real CT-ICH.

``generate(p, image_size, seed)`` returns, per patient, a stack of contiguous axial slices from the skull
base to the vertex, in Hounsfield units, with a 0..5 mask of five hemorrhage subtypes and the image-level
labels derived from it. What a slice holds depends on its level: scalp, a skull of cortical tables and
diploe, grey/white matter with gyri and sulci, ventricles and cisterns whose shape follows the level, the
falx, skull-base bone with air cells and streak artefacts, and hyperdense mimics that are *not* bleeds
(pineal, choroid plexus and falx calcifications).

Bleeds are 3D: each lesion has a centre level, a span in slices and a cross-section that grows to its
largest area in the middle of the span and shrinks towards both ends. Subtypes keep their shapes and
places (epidural lens and subdural crescent against the skull, parenchymal blob with an oedema rim,
blood in the ventricles, blood in the sulci and cisterns). The defaults reproduce DESIGN.md's real
CT-ICH statistics, the shortcuts included (bleeds cluster in the middle fifths of the head, a skull
fracture is far more often seen on positive slices): ``summary_statistics`` measures them and
``bench/synthetic_stats.py`` prints them next to the real figures.

Geometry is defined in millimetres on a fixed 230 mm field of view and rasterised at
``supersample * image_size``; the final slice is the block mean (partial volume), blurred by the
scanner's point spread and given correlated noise.

Which patients bleed is one draw from the seed (exactly ``round(positive_patient_fraction * patients)``
do), and the bleeds' levels, spans, areas, densities and fractures are stratified draws over the whole
cohort, so that even 60 patients show the intended statistics. A patient's anatomy and its bleeds'
subtypes and places are drawn from ``numpy.random.default_rng([seed, patient, 1])``. The same seed gives
the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from weak2full.errors import InvalidParameterError
from weak2full.params import SyntheticParams

__all__ = [
    "CLASSES",
    "MASK_CLASSES",
    "FOV_MM",
    "SyntheticData",
    "generate",
    "randomised_params",
    "summary_statistics",
]

MASK_CLASSES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
CLASSES = ["any"] + MASK_CLASSES
FOV_MM = 230.0  # field of view; a 512-pixel real slice is ~0.45 mm a pixel

EPIDURAL, INTRAPARENCHYMAL, INTRAVENTRICULAR, SUBARACHNOID, SUBDURAL = 1, 2, 3, 4, 5

_AIR, _FAT, _CSF, _SCALP = -1000.0, -90.0, 8.0, 40.0
_FIELD_STEP_MM = 1.8  # grid of the smooth random fields (sulci, air cells): same anatomy at any image_size


@dataclass(frozen=True)
class SyntheticData:
    """Synthetic slices of ``patients * slices_per_patient`` = N rows.

    image: int16 (N, H, W) Hounsfield units. mask: uint8 (N, H, W), 0 background, k = MASK_CLASSES[k-1].
    label: uint8 (N, 6), columns CLASSES; label[:, k] == mask has class k, label[:, 0] == any.
    patient, slice: int32 (N,); a patient's slices are contiguous, slice 0 at the skull base.
    fracture: bool (N,), a skull fracture is visible on the slice. pixel_spacing: (dy, dx) in mm.
    """

    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    patient: np.ndarray
    slice: np.ndarray
    fracture: np.ndarray
    pixel_spacing: tuple[float, float]
    classes: tuple[str, ...] = tuple(CLASSES)
    mask_classes: tuple[str, ...] = tuple(MASK_CLASSES)


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class _Lesion:
    kind: int  # 1..5, MASK_CLASSES[kind - 1]
    centre: float  # slice index (fractional) of the largest cross-section
    half_span: float  # slices from the centre to where the cross-section vanishes
    area_mm2: float  # largest cross-section
    hu: float  # blood density of the core
    theta: float  # angle of the place around the head (rad, 0 = patient's left, pi/2 = posterior)
    depth: float  # intraparenchymal: depth below the brain surface as a share of the brain radius
    shape: np.ndarray  # 3 harmonics (amplitude, phase) that make the outline irregular
    fracture: bool  # a fracture runs over this lesion's slices


@dataclass
class _Patient:
    a0: float  # AP semi-axis of the head at its widest level (mm, scalp included)
    b0: float  # left-right semi-axis
    centre: tuple[float, float]  # (u, v) offset of the head in the field of view, mm
    tilt: float  # in-plane rotation, rad
    skull_mm: float
    scalp_mm: float
    atrophy: float  # 0 young .. 1 old: wider ventricles, sulci and subarachnoid space
    grey_hu: float
    white_hu: float
    outline: np.ndarray  # small Fourier bumps of the skull outline (amplitude, phase) x 4
    pineal: float  # calcification HU, 0 = none
    choroid: float
    falx_calc: float
    lesions: list[_Lesion]
    fracture_slices: np.ndarray  # bool (S,)
    fracture_theta: np.ndarray  # float (S,), angle of the fracture on each slice


def _check(image_size: int) -> None:
    if image_size < 32:
        raise InvalidParameterError(f"image_size must be >= 32 for a synthetic head, got {image_size}.")


def _plan_patient(p: SyntheticParams, rng: np.random.Generator, positive: bool) -> _Patient:
    """Draw one patient's anatomy and its bleeds' subtypes and places (sizes come later, per cohort)."""
    lesions: list[_Lesion] = []
    if positive:
        weights = np.asarray(p.subtype_weights, dtype=float)
        for _ in range(1 + rng.poisson(p.extra_lesions)):
            lesions.append(_Lesion(
                kind=int(rng.choice(5, p=weights / weights.sum())) + 1,
                centre=0.0, half_span=0.0, area_mm2=0.0, hu=0.0,
                theta=float(rng.uniform(0, 2 * np.pi)),
                depth=float(rng.uniform(0.15, 0.6)),
                shape=np.stack([rng.normal(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
                fracture=False,
            ))
    calc = p.calcification_rate
    return _Patient(
        a0=float(np.clip(rng.normal(91.0, 4.0), 80.0, 102.0)),
        b0=float(np.clip(rng.normal(75.0, 3.5), 66.0, 84.0)),
        centre=(float(rng.normal(0, 3.0)), float(rng.normal(0, 4.0))),
        tilt=float(rng.normal(0, np.deg2rad(4.0))),
        skull_mm=float(np.clip(rng.normal(6.0, 0.8), 4.0, 8.5)),
        scalp_mm=float(np.clip(rng.normal(5.0, 1.0), 3.0, 8.0)),
        atrophy=float(rng.random() ** 1.5),
        grey_hu=float(rng.normal(39.0, 1.2)),
        white_hu=float(rng.normal(30.0, 1.2)),
        outline=np.stack([rng.normal(0, 0.012, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1),
        pineal=float(rng.uniform(150, 400)) if rng.random() < calc else 0.0,
        choroid=float(rng.uniform(100, 300)) if rng.random() < calc else 0.0,
        falx_calc=float(rng.uniform(150, 350)) if rng.random() < 0.3 * calc else 0.0,
        lesions=lesions,
        fracture_slices=np.zeros(0, bool),
        fracture_theta=np.zeros(0),
    )


def _stratified(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniforms in (0, 1), one in each of n equal bins, shuffled: a cohort's draws then follow the
    distribution closely even when it has only a few dozen bleeds."""
    return (rng.permutation(n) + rng.uniform(0.02, 0.98, n)) / n


def _size_lesions(p: SyntheticParams, lesions: list[_Lesion], rng: np.random.Generator, n_slices: int):
    """Give every bleed of the cohort its level, span, area, density and fracture (stratified draws)."""
    n = len(lesions)
    if n == 0:
        return
    z = {k: ndtri(_stratified(rng, n)) for k in ("level", "span", "area", "hu")}
    with_fracture = _stratified(rng, n) < p.fracture_rate_positive
    lo, hi = p.blood_hu
    for i, les in enumerate(lesions):
        level = float(np.clip(p.level_mean + p.level_sd * z["level"][i], 0.05, 0.95))
        if les.kind == INTRAVENTRICULAR:  # only where there are ventricles
            level = float(np.clip(level, 0.44, 0.7))
        span = p.span_median * np.exp(p.span_log_sd * z["span"][i])
        if les.kind == SUBDURAL:  # subdurals spread far over the convexity
            span *= 1.3
        area = float(np.clip(p.area_median * np.exp(p.area_log_sd * z["area"][i]), 0.03, 8.0))  # % of slice
        les.centre = level * (n_slices - 1)
        les.half_span = float(np.clip(span, 1.0, 0.8 * n_slices)) / 2.0
        les.area_mm2 = area * FOV_MM**2 / 100.0
        les.hu = float(np.clip(p.blood_hu_mean + p.blood_hu_sd * z["hu"][i], lo, hi))
        les.fracture = bool(with_fracture[i])


def _plan_fractures(pat: _Patient, rng: np.random.Generator, n_slices: int, incidental: bool) -> None:
    """Which slices show a skull fracture, and where: over a bleed that has one, and an ``incidental``
    one of 3..8 slices anywhere above the skull base."""
    fracture = np.zeros(n_slices, bool)
    theta = np.zeros(n_slices)
    for les in pat.lesions:
        if les.fracture:
            lo = int(np.ceil(les.centre - les.half_span))
            hi = int(np.floor(les.centre + les.half_span))
            sl = slice(max(lo, 0), min(hi, n_slices - 1) + 1)
            fracture[sl] = True
            near = les.kind in (EPIDURAL, SUBDURAL)  # a fracture lies over an extra-axial bleed
            theta[sl] = les.theta + (rng.normal(0, 0.15) if near else rng.uniform(0, 2 * np.pi))
    span = int(rng.integers(3, 9))
    if incidental:
        start = int(rng.integers(int(0.2 * n_slices), max(int(0.2 * n_slices) + 1, n_slices - span)))
        sl = slice(start, min(start + span, n_slices))
        fresh = ~fracture[sl]
        fracture[sl] = True
        theta[sl] = np.where(fresh, rng.uniform(0, 2 * np.pi), theta[sl])
    pat.fracture_slices, pat.fracture_theta = fracture, theta


# ---------------------------------------------------------------------------------------- rasterising


def _field_volume(rng: np.random.Generator, n_slices: int, sigma_mm: float, band: bool) -> np.ndarray:
    """Smooth unit-std random field (S, G, G) on the fixed field grid; ``band``: band-pass (a network of
    zero-crossings spaced ~2.5 sigma apart, used for sulci)."""
    g = int(np.ceil(FOV_MM / _FIELD_STEP_MM))
    white = rng.standard_normal((n_slices, g, g)).astype(np.float32)
    s = sigma_mm / _FIELD_STEP_MM
    f = ndimage.gaussian_filter(white, (0.6, s, s), mode="wrap")
    if band:
        f = f - ndimage.gaussian_filter(white, (0.6, 2 * s, 2 * s), mode="wrap")
    return f / (f.std() + 1e-6)


def _capsule(u, v, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance (mm) from points (u, v) to the segment a-b."""
    au, av = a
    du, dv = b[0] - au, b[1] - av
    t = np.clip(((u - au) * du + (v - av) * dv) / (du * du + dv * dv + 1e-9), 0.0, 1.0)
    return np.hypot(u - au - t * du, v - av - t * dv)


def _bump(z: float, lo: float, hi: float, ramp: float = 0.06) -> float:
    """1 inside [lo, hi], falling linearly to 0 over ``ramp`` outside: how present a structure is."""
    return float(np.clip(min(z - lo + ramp, hi - z + ramp) / ramp, 0.0, 1.0))


def _angle_diff(a, b):
    return (a - b + np.pi) % (2 * np.pi) - np.pi


class _Slicer:
    """Rasterises one patient, slice by slice, on the supersampled grid.

    Only the box around the head is rendered (``rows`` x ``cols`` of the render grid, aligned to whole
    final pixels); everything outside it is air.
    """

    def __init__(self, p: SyntheticParams, pat: _Patient, image_size: int, rng: np.random.Generator,
                 n_slices: int):
        self.p, self.pat, self.rng, self.n = p, pat, rng, n_slices
        self.ss = p.supersample
        self.size = image_size * self.ss
        self.px = FOV_MM / self.size  # mm per supersampled pixel
        c = (np.arange(self.size) + 0.5) * self.px - FOV_MM / 2
        half_x, half_y = 1.12 * pat.b0 + 4.0, 1.06 * pat.a0 + 4.0  # head half-extents with tilt, bumps
        self.rows = self._box(c, pat.centre[1] - half_y, pat.centre[1] + half_y)
        self.cols = self._box(c, pat.centre[0] - half_x, pat.centre[0] + half_x)
        y, x = np.meshgrid(c[self.rows], c[self.cols], indexing="ij")  # rows anterior->posterior
        # Bilinear weights from the field grid to the rendered box (a field slice is then 4 gathers).
        self.fy = self._lerp(y)
        self.fx = self._lerp(x)
        x, y = x - pat.centre[0], y - pat.centre[1]
        ct, st = np.cos(pat.tilt), np.sin(pat.tilt)
        self.u = (ct * x + st * y).astype(np.float32)  # head frame: u left-right, v anterior(-)..posterior(+)
        self.v = (-st * x + ct * y).astype(np.float32)
        self.r = np.hypot(self.u, self.v)
        self.theta = np.arctan2(self.v, self.u)
        th = self.theta
        self.bumps = sum(a * np.cos((i + 2) * th + ph) for i, (a, ph) in enumerate(pat.outline))
        self.front_back = (self.v / np.maximum(self.r, 1e-3)) ** 2  # 1 on the AP axis, 0 on the LR axis
        self.sulci_field = _field_volume(rng, n_slices, 2.6, band=True)
        self.cell_field = _field_volume(rng, n_slices, 2.0, band=False)

    def _box(self, c: np.ndarray, lo: float, hi: float) -> slice:
        """Render-grid index range covering [lo, hi] mm, in whole final pixels."""
        a = int(np.searchsorted(c, lo)) // self.ss * self.ss
        b = -(-int(np.searchsorted(c, hi)) // self.ss) * self.ss
        return slice(max(a, 0), min(b, self.size))

    @staticmethod
    def _lerp(coord_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = int(np.ceil(FOV_MM / _FIELD_STEP_MM))
        pos = np.clip((coord_mm + FOV_MM / 2) / _FIELD_STEP_MM - 0.5, 0, g - 1)
        i0 = np.minimum(pos.astype(int), g - 2)
        return i0, i0 + 1, (pos - i0).astype(np.float32)

    def _up(self, vol: np.ndarray, k: int) -> np.ndarray:
        """Slice k of a field, bilinearly resampled to the rendered box."""
        (y0, y1, wy), (x0, x1, wx) = self.fy, self.fx
        f = vol[k]
        top = f[y0, x0] * (1 - wx) + f[y0, x1] * wx
        bottom = f[y1, x0] * (1 - wx) + f[y1, x1] * wx
        return top * (1 - wy) + bottom * wy

    def render(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Slice k in the rendered box: HU float32 before blur and noise, the bleed label map uint8, where
        it is dense (bool, bone or calcification: a final pixel touching it is never labelled blood), and
        the brain (bool, where texture goes)."""
        p, pat = self.p, self.pat
        z = k / (self.n - 1)
        u, v, r, th = self.u, self.v, self.r, self.theta

        # ---- head, skull, cranial cavity: an egg-shaped ellipse whose size follows the level
        s = np.sqrt(max(1.0 - ((z - 0.42) / 0.64) ** 2, 0.1))
        az = pat.a0 * s
        bz = pat.b0 * s * (1.0 + 0.05 * np.clip(v / az, -1, 1))  # wider at the back
        rho = np.hypot(u / bz, v / az) * (1.0 + self.bumps)
        ray = np.where(rho > 1e-3, r / np.maximum(rho, 1e-3), pat.b0)  # head radius along each ray
        d_out = (1.0 - rho) * ray  # depth below the skin, mm
        # Skull: thicker front and back, and cut obliquely (so thicker) near the vertex and the base.
        skull = pat.skull_mm * (1.0 + 0.25 * self.front_back)
        skull = skull * (1.0 + 2.0 * max(z - 0.78, 0.0) / 0.22 + 1.5 * max(0.12 - z, 0.0) / 0.12)
        d_in = d_out - pat.scalp_mm - skull  # depth below the inner table, mm
        head = rho <= 1.0
        cavity = d_in > 0
        img = np.full(u.shape, _AIR, np.float32)
        img[head] = _SCALP
        img[head & (d_out > 1.2) & (d_out < 2.6)] = _FAT
        g = self._up(self.sulci_field, k)  # band-pass field: sulci, and texture of bone and blood
        bone_f = np.clip(g, -2.0, 2.0)
        in_bone = (d_out >= pat.scalp_mm) & ~cavity
        t = (d_out - pat.scalp_mm) / skull  # 0 outer .. 1 inner table
        tables = (t < 0.3) | (t > 0.72)
        img[in_bone] = np.where(tables, 1550.0 + 120 * bone_f, 650.0 + 150 * bone_f)[in_bone]

        # ---- skull base: petrous ridges, clivus, anterior fossa floor with air cells (sinuses)
        base = _bump(z, -1.0, 0.1, 0.08)
        base_bone = np.zeros(u.shape, bool)
        if base > 0:
            for sgn in (-1, 1):
                # Petrous ridges: from the apex beside the clivus back and out to the mastoid.
                pet = _capsule(u, v, (sgn * 10.0, -2.0), (sgn * 0.62 * pat.b0 * s, 16.0))
                base_bone |= pet < (2.0 + 2.5 * (np.abs(u) / (0.62 * pat.b0 * s))) * base
            sphenoid = np.hypot(u / 10.0, (v + 12.0) / 7.0) < base
            floor = v < -az * (0.5 + 2.5 * z)  # orbital roofs and frontal/ethmoid sinuses
            base_bone = (base_bone | sphenoid | floor) & cavity
            # Air cells inside the bone (sinuses, mastoids): where a smooth random field is high.
            cells = base_bone & (sphenoid | floor) & (self._up(self.cell_field, k) > 0.6)
            img[base_bone] = (900.0 + 250 * bone_f)[base_bone]
            img[cells] = _AIR + 50.0
        brain = cavity & ~base_bone

        # ---- fracture: a thin soft-tissue gap through the skull
        if pat.fracture_slices[k]:
            gap = np.abs(_angle_diff(th, pat.fracture_theta[k])) * r < 0.9
            img[gap & in_bone] = _SCALP

        # ---- brain: cortex lining sulci, white matter, subarachnoid space
        sas = 0.6 + 1.6 * pat.atrophy
        depth_sulci = 14.0 * s
        img[brain] = pat.white_hu
        grey = brain & ((d_in < sas + 3.0) | ((np.abs(g) < 0.75) & (d_in < sas + depth_sulci + 2.0)))
        img[grey] = pat.grey_hu
        csf = brain & (d_in < sas)
        sulci = brain & (np.abs(g) < 0.12 + 0.12 * pat.atrophy) & (d_in < sas + depth_sulci)

        # ---- deep structures: nuclei, ventricles, cisterns, fissures (level-dependent)
        vs = 1.0 + 0.9 * pat.atrophy  # ventricle width
        sc = pat.a0 / 91.0  # internal structures scale with the head
        nuclei = _bump(z, 0.38, 0.54)
        if nuclei > 0:
            deep = np.zeros(u.shape, bool)
            for sgn in (-1, 1):
                deep |= np.hypot((u - sgn * 19 * sc) / (6 * nuclei), (v + 2 * sc) / (11 * nuclei)) < 1
                deep |= np.hypot((u - sgn * 9 * sc) / (7 * nuclei), (v - 11 * sc) / (8 * nuclei)) < 1
                deep |= np.hypot((u - sgn * 9 * sc) / (4 * nuclei), (v + 17 * sc) / (5 * nuclei)) < 1
            img[deep & brain] = pat.grey_hu - 1.0
        vent = np.zeros(u.shape, bool)
        fh, body, atr = _bump(z, 0.44, 0.58), _bump(z, 0.56, 0.72), _bump(z, 0.44, 0.56)
        for sgn in (-1, 1):
            if fh > 0:
                vent |= _capsule(u, v, (sgn * 4 * sc, -26 * sc), (sgn * 8 * sc, -6 * sc)) < 2.6 * vs * fh
            if body > 0:
                vent |= _capsule(u, v, (sgn * 6 * sc, -22 * sc), (sgn * 9 * sc, 20 * sc)) < 2.8 * vs * body
            if atr > 0:
                vent |= _capsule(u, v, (sgn * 13 * sc, 10 * sc), (sgn * 19 * sc, 32 * sc)) < 3.2 * vs * atr
        third = _bump(z, 0.36, 0.48)
        if third > 0:
            vent |= _capsule(u, v, (0.0, -8 * sc), (0.0, 8 * sc)) < 1.4 * vs * third
        fourth = _bump(z, 0.1, 0.26)
        if fourth > 0:
            vent |= np.hypot(u / (5.0 * fourth), (v - 24 * sc) / (3.5 * fourth)) < 1
        vent &= brain
        cistern = np.zeros(u.shape, bool)
        supra = _bump(z, 0.26, 0.34)
        if supra > 0:
            cistern |= np.hypot(u, v + 10 * sc) < 7.0 * supra * (1 + 0.25 * np.cos(5 * th))
            ambient = (np.abs(np.hypot(u, v - 6 * sc) - 11 * sc) < 0.8 * supra * vs) & (v > 6 * sc)
            cistern |= ambient  # around the back of the midbrain
        sylvian = _bump(z, 0.3, 0.5)
        if sylvian > 0:
            for sgn in (-1, 1):
                # A wavy cleft from the lateral surface inwards, ending before the basal ganglia.
                outer = (sgn * 0.95 * pat.b0 * s, -8 * sc)
                cleft = _capsule(u, v + 3.0 * g, outer, (sgn * 36 * sc, -12 * sc))
                cistern |= cleft < 0.9 * vs * sylvian
        upper = _bump(z, 0.74, 2.0, 0.3)
        fissure = (np.abs(u) < 0.9 * vs) & ((v < -30 * sc * (1 - upper)) | (v > 32 * sc * (1 - upper)))
        fissure &= brain & (z > 0.4)
        cistern |= fissure
        csf_all = (csf | sulci | vent | cistern) & brain
        img[csf_all] = _CSF
        falx = fissure & (np.abs(u) < 0.45)
        img[falx] = 85.0

        # ---- hyperdense mimics (not hemorrhage): calcified pineal, choroid plexus, falx plaque
        if pat.pineal and _bump(z, 0.4, 0.48, 0.02) > 0:
            img[np.hypot(u, v - 14 * sc) < 2.2] = pat.pineal
        if pat.choroid and atr > 0.5:
            for sgn in (-1, 1):
                img[np.hypot(u - sgn * 16 * sc, v - 21 * sc) < 2.4 * atr] = pat.choroid
        if pat.falx_calc and z > 0.62:
            img[falx & (np.abs(v + 40 * sc) < 5)] = pat.falx_calc

        # ---- streaks from dense skull base bone (and the dark band between the petrous apices)
        if p.streaks and p.streak_hu > 0 and z < 0.32:
            amp = p.streak_hu * ((0.32 - z) / 0.32) ** 1.5
            streak = np.zeros(u.shape, np.float32)
            for i in range(6):
                ang = self.rng.uniform(0, np.pi)
                cu, cv = self.rng.normal(0, 12.0), self.rng.normal(5.0, 6.0)
                dist = np.abs((u - cu) * np.sin(ang) - (v - cv) * np.cos(ang))
                streak += (1 if i % 2 else -1) * np.exp(-0.5 * (dist / 0.8) ** 2)
            streak -= 0.4 * np.exp(-0.5 * ((v - 4.0) / 5.0) ** 2) * (np.abs(u) < 25)
            img[brain] += amp * streak[brain]

        # ---- hemorrhages (they do not paint over bone or calcifications)
        dense = img > 100.0
        lab = np.zeros(u.shape, np.uint8)
        for les in pat.lesions:
            f2 = 1.0 - ((k - les.centre) / (les.half_span + 0.5)) ** 2  # cross-section / largest
            if f2 <= 0 or z < 0.18:  # no bleeds modelled in the skull base slices (as rare as in CT-ICH)
                continue
            area = les.area_mm2 * f2
            region, rim = self._lesion_region(les, area, brain, d_in, ray, vent, csf_all)
            region &= ~dense
            if rim is not None:  # oedema: hypodense brain around a parenchymal bleed
                edge = rim & ~region & brain & ~csf_all
                img[edge] -= self.p.oedema_hu
            if not region.any():
                continue
            core = les.hu + 3.0 * g  # a little internal heterogeneity
            img[region] = core[region]
            lab[region] = les.kind
        return img, lab, dense, brain

    def _lesion_region(self, les: _Lesion, area: float, brain, d_in, ray, vent, csf_all):
        """The bleed's pixels on this slice (and an oedema rim for intraparenchymal bleeds)."""
        u, v, th = self.u, self.v, self.theta
        rim = None
        if les.kind in (EPIDURAL, SUBDURAL):
            # Along the inner table: thickness profile (1 - x^2)^p over an arc of length L = 2 w R.
            # Epidural: short and thick, biconvex (p=0.5); subdural: long, thin crescent (p=0.3).
            aspect, power, integral = (0.28, 0.5, np.pi / 2) if les.kind == EPIDURAL else (0.06, 0.3, 1.7)
            # Radius of the inner table, to turn the arc length into an angle.
            inner = float(np.median(ray[brain])) - self.pat.scalp_mm - self.pat.skull_mm
            length = min(np.sqrt(2 * area / (aspect * integral)), 0.9 * np.pi * inner)
            thick = 2 * area / (length * integral)
            x = _angle_diff(th, les.theta) / (length / (2 * inner))
            prof = thick * np.clip(1.0 - x * x, 0.0, None) ** power
            region = brain & (d_in < prof)
        elif les.kind == INTRAPARENCHYMAL:
            radius = np.sqrt(area / np.pi)
            cu, cv = self._inside_point(les, brain)
            dist = np.hypot((u - cu) / 1.2, (v - cv) / 0.85) / radius
            ang = np.arctan2(v - cv, u - cu)
            dist = dist / (1.0 + sum(a * np.cos((i + 2) * ang + ph) for i, (a, ph) in enumerate(les.shape)))
            region = brain & (dist < 1.0)
            rim = dist < 1.0 + (1.5 + 0.3 * radius) / radius
        elif les.kind == INTRAVENTRICULAR:
            # Dependent blood in the occipital horns, or a cast of the ventricle around its centre.
            sc = self.pat.a0 / 91.0
            sgn = 1 if np.cos(les.theta) > 0 else -1
            cu, cv = (sgn * 15 * sc, 26 * sc) if np.sin(les.theta) > -0.3 else (sgn * 7 * sc, -8 * sc)
            region = vent & (np.hypot(u - cu, v - cv) < np.sqrt(area / np.pi) * 1.6)
        else:  # subarachnoid: sulci, fissures and cisterns near one place on the convexity or the base
            cu, cv = self._inside_point(les, brain, surface=True)
            region = csf_all & ~vent & (np.hypot(u - cu, v - cv) < np.sqrt(area / (0.3 * np.pi)))
            parts, n = ndimage.label(region, structure=np.ones((3, 3)))
            if n > 1:  # blood tracks along one connected set of sulci from where it started
                region = parts == 1 + np.argmax(np.bincount(parts.ravel(), minlength=n + 1)[1:])
            # ... and fills them wall to wall, which makes the thin sulci at least a pixel wide.
            region = ndimage.binary_dilation(region, iterations=self.ss) & brain & ~vent
        return region, rim

    def _inside_point(self, les: _Lesion, brain, surface: bool = False) -> tuple[float, float]:
        """A point in the brain in the lesion's direction: just under the surface, or at its depth."""
        ray_u, ray_v = np.cos(les.theta), np.sin(les.theta)
        along = self.u * ray_u + self.v * ray_v
        on_ray = brain & (np.abs(self.u * ray_v - self.v * ray_u) < self.px)
        if not on_ray.any():
            return 0.0, 0.0
        reach = float(along[on_ray].max())
        frac = 0.92 if surface else 1.0 - les.depth
        return ray_u * reach * frac, ray_v * reach * frac


def _downsample(a: np.ndarray, ss: int) -> np.ndarray:
    """Mean over ss x ss blocks: (H*ss, W*ss) -> (H, W), the partial-volume average."""
    h, w = a.shape
    return a.reshape(h // ss, ss, w // ss, ss).mean(axis=(1, 3))


def _labels_from_mask(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """label uint8 (N, 1 + n_classes): any, then one column per mask class (mask non-empty)."""
    present = np.zeros((mask.shape[0], n_classes + 1), bool)
    for k in range(1, n_classes + 1):
        present[:, k] = (mask == k).any(axis=(1, 2))
    present[:, 0] = present[:, 1:].any(axis=1)
    return present.astype(np.uint8)


def randomised_params(ranges: dict[str, tuple[float, float]], rng: np.random.Generator,
                      **fixed) -> SyntheticParams:
    """Domain randomisation: the default settings with each setting in ``ranges`` drawn uniformly from
    its [low, high] (in sorted key order, so a seed gives the same draw), then ``fixed`` set as given.

    ``fixed`` is not validated again (pretraining renders one patient at a time: ``patients=1``).
    """
    drawn = {k: float(rng.uniform(*ranges[k])) for k in sorted(ranges)}
    return SyntheticParams().model_copy(update={**drawn, **fixed})


def generate(p: SyntheticParams, image_size: int, seed: int) -> SyntheticData:
    """Generate ``p.patients * p.slices_per_patient`` synthetic head-CT slices of ``image_size``².

    Deterministic: the same (params, image_size, seed) gives the same bytes.
    """
    _check(image_size)
    n_slices, ss = p.slices_per_patient, p.supersample
    spacing = FOV_MM / image_size
    n = p.patients * n_slices
    image = np.empty((n, image_size, image_size), np.int16)
    mask = np.zeros((n, image_size, image_size), np.uint8)
    fracture = np.zeros(n, bool)
    psf = p.psf_mm / spacing  # scanner blur, in final pixels
    tex_px = max(0.5, 1.0 / spacing)  # brain texture grain ~1 mm
    # Exactly round(fraction * patients) patients bleed: the positive share does not depend on luck.
    n_pos = int(round(p.positive_patient_fraction * p.patients))
    positive = np.zeros(p.patients, bool)
    positive[np.random.default_rng([seed, p.patients]).permutation(p.patients)[:n_pos]] = True
    rngs = [np.random.default_rng([seed, pid, 1]) for pid in range(p.patients)]
    plans = [_plan_patient(p, rng, bool(pos)) for rng, pos in zip(rngs, positive)]
    lesions = [les for pat in plans for les in pat.lesions]
    _size_lesions(p, lesions, np.random.default_rng([seed, 2]), n_slices)
    # Incidental fractures (mean 5.5 slices) on the share of patients that puts one on
    # fracture_rate_negative of all slices.
    incidental = _stratified(np.random.default_rng([seed, 3]), p.patients) < min(
        1.0, p.fracture_rate_negative * n_slices / 5.5)
    for pid, (pat, rng) in enumerate(zip(plans, rngs)):
        _plan_fractures(pat, rng, n_slices, bool(incidental[pid]))
        slicer = _Slicer(p, pat, image_size, rng, n_slices)
        box = (slice(slicer.rows.start // ss, slicer.rows.stop // ss),
               slice(slicer.cols.start // ss, slicer.cols.stop // ss))
        for k in range(n_slices):
            hr, lab, dense, brain_box = slicer.render(k)
            img = np.full((image_size, image_size), _AIR, np.float32)
            img[box] = _downsample(hr, ss)
            brain = np.zeros((image_size, image_size), np.float32)
            brain[box] = _downsample(brain_box.astype(np.float32), ss)
            if psf > 0:
                img = ndimage.gaussian_filter(img, psf)
            # Brain texture (~1 mm, so blood is not the only thing with structure) and correlated noise.
            tex = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), tex_px)
            img += tex * (p.texture_hu / (tex.std() + 1e-6)) * brain
            noise = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 0.7)
            img += noise * (p.noise_hu / (noise.std() + 1e-6))
            i = pid * n_slices + k
            image[i] = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
            # A final pixel is labelled with the subtype covering at least half of it, unless it holds bone.
            no_bone = _downsample(dense.astype(np.float32), ss) == 0
            for kind in np.unique(lab[lab > 0]):
                mask[i][box][(_downsample((lab == kind).astype(np.float32), ss) >= 0.5) & no_bone] = kind
            fracture[i] = pat.fracture_slices[k]
    return SyntheticData(
        image=image,
        mask=mask,
        label=_labels_from_mask(mask, len(MASK_CLASSES)),
        patient=np.repeat(np.arange(p.patients, dtype=np.int32), n_slices),
        slice=np.tile(np.arange(n_slices, dtype=np.int32), p.patients),
        fracture=fracture,
        pixel_spacing=(spacing, spacing),
    )


# ----------------------------------------------------------------------------------------- statistics


def summary_statistics(data: SyntheticData, ring_mm: float = 5.0) -> dict:
    """Measure the figures DESIGN.md gives for real CT-ICH on a generated (or any) dataset.

    Returns a dict: ``positive_slices``, ``positive_patients`` (shares); ``span`` (percentiles 10/50/90
    of runs of consecutive positive slices per patient); ``area_pct`` (percentiles 10/25/50/75/90 of the
    lesion area per positive slice, % of the slice); ``components`` (percentiles 50/90 per positive slice,
    8-connected); ``blood_hu``, ``brain_hu``, ``contrast_hu`` (percentiles 10/50/90 per positive slice:
    mean HU in the mask, mean HU of the brain (15..100 HU) in a ``ring_mm`` ring around it, and
    their difference); ``level_fifths`` (share of positive slices in each fifth skull base -> vertex);
    ``fracture_pos``, ``fracture_neg``; ``texture_hu`` (median std in 5x5 windows of brain tissue).
    """
    anyp = data.label[:, 0].astype(bool)
    stats: dict = {
        "positive_slices": float(anyp.mean()),
        "positive_patients": float(np.mean([anyp[data.patient == q].any() for q in np.unique(data.patient)])),
    }
    runs = []
    for q in np.unique(data.patient):
        pos = anyp[data.patient == q].astype(np.int8)
        edges = np.diff(np.concatenate([[0], pos, [0]]))
        runs.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    stats["span"] = np.percentile(runs, [10, 50, 90]).tolist() if runs else [0.0] * 3

    fg = data.mask[anyp] > 0
    hu = data.image[anyp].astype(np.float32)
    stats["area_pct"] = np.percentile(100.0 * fg.mean(axis=(1, 2)), [10, 25, 50, 75, 90]).tolist()
    comps = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in fg]
    stats["components"] = np.percentile(comps, [50, 90]).tolist()
    ring_px = max(1, int(round(ring_mm / data.pixel_spacing[0])))
    blood, brain = [], []
    for m, h in zip(fg, hu):
        ring = ndimage.binary_dilation(m, iterations=ring_px) & ~m & (h >= 15) & (h <= 100)
        if ring.any():
            blood.append(h[m].mean())
            brain.append(h[ring].mean())
    blood, brain = np.asarray(blood), np.asarray(brain)
    stats["blood_hu"] = np.percentile(blood, [10, 50, 90]).tolist()
    stats["brain_hu"] = np.percentile(brain, [10, 50, 90]).tolist()
    stats["contrast_hu"] = np.percentile(blood - brain, [10, 50, 90]).tolist()

    n_per = np.bincount(data.patient)[data.patient]
    rel = data.slice / np.maximum(n_per - 1, 1)
    fifth = np.minimum((rel * 5).astype(int), 4)
    stats["level_fifths"] = [float(anyp[fifth == i].mean()) for i in range(5)]
    stats["fracture_pos"] = float(data.fracture[anyp].mean())
    stats["fracture_neg"] = float(data.fracture[~anyp].mean())

    # Local texture: std in 5x5 windows lying wholly in brain-density tissue, mid-level slices.
    mid = (rel > 0.4) & (rel < 0.8) & ~anyp
    stds = []
    for h in data.image[mid][:50].astype(np.float32):
        tissue = (h > 15) & (h < 50)
        whole = ndimage.binary_erosion(tissue, np.ones((5, 5)))
        mean = ndimage.uniform_filter(h, 5)
        var = ndimage.uniform_filter(h * h, 5) - mean * mean
        stds.append(np.sqrt(np.maximum(var[whole], 0)))
    stats["texture_hu"] = float(np.median(np.concatenate(stds))) if stds else float("nan")
    return stats
