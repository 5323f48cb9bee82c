"""The one schema for ``params.yaml``.

Every stage starts with :func:`load_params`, which validates the *whole* file, so an unknown key, a wrong
type or an impossible value is reported before any work is done, naming the key (sklearn's wording:
"The 'pseudo_masks.crf.compat' parameter must be ... Got ... instead."). Sections mirror the DVC stage
names; ``dvc.yaml`` declares, per stage, exactly the dotted keys that stage reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weak2full.errors import InvalidParameterError

__all__ = [
    "Params",
    "load_params",
    "CommonParams",
    "DataParams",
    "SyntheticParams",
    "InputParams",
    "TrainParams",
    "AugmentParams",
    "ClassifierParams",
    "BaselineParams",
    "CamsParams",
    "CRFParams",
    "CalibrationParams",
    "PseudoMaskParams",
    "SegmenterParams",
    "OracleParams",
    "EvaluateParams",
    "ExportParams",
    "PretrainParams",
    "PretrainNetParams",
    "SYNTHETIC_WEIGHTS",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Window = tuple[float, float]  # (level, width) in HU


def _check_window(w: Window) -> Window:
    if w[1] <= 0:
        raise ValueError(f"a window is [level, width] with width > 0, got {list(w)}")
    return w


def _check_windows(ws: list[Window]) -> list[Window]:
    if not ws:
        raise ValueError("at least one window is needed")
    return [_check_window(w) for w in ws]


# --------------------------------------------------------------------------------------------- common


class CommonParams(_Section):
    seed: int = Field(0, ge=0)
    # auto: CUDA when available, else CPU. Tests and the determinism contract use the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Which image-level classes the weak chain learns and scores. `any` is the union of all bleeds.
    classes: list[str] = Field(default_factory=lambda: ["any"], min_length=1)
    # python: one process; torchrun: `torchrun --nproc_per_node nproc` for the training stages.
    launcher: Literal["python", "torchrun"] = "python"
    nproc: int = Field(1, ge=1)


# ----------------------------------------------------------------------------------------------- data


class SyntheticParams(_Section):
    """Knobs of the synthetic head-CT generator (weak2full.synthetic).

    The defaults reproduce DESIGN.md's real CT-ICH statistics, shortcuts included; `bench/synthetic_stats.py`
    prints them next to the real figures. Making lesions bigger or brighter makes the task easier than
    real CT, so change them only to study that.
    """

    patients: int = Field(60, ge=3)
    slices_per_patient: int = Field(32, ge=3)  # skull base -> vertex
    positive_patient_fraction: float = Field(0.48, ge=0.0, le=1.0)
    extra_lesions: float = Field(0.15, ge=0.0)  # mean number of further bleeds in a positive patient
    # Relative frequency of epidural, intraparenchymal, intraventricular, subarachnoid, subdural bleeds.
    subtype_weights: list[float] = Field(default_factory=lambda: [0.15, 0.3, 0.12, 0.18, 0.25])
    level_mean: float = Field(0.55, ge=0.0, le=1.0)  # bleed centre level, 0 skull base .. 1 vertex
    level_sd: float = Field(0.11, gt=0.0)
    span_median: float = Field(4.5, ge=1.0)  # slices a bleed spans (lognormal)
    span_log_sd: float = Field(0.85, ge=0.0)
    area_median: float = Field(0.7, gt=0.0)  # largest cross-section of a bleed, % of the slice (lognormal)
    area_log_sd: float = Field(0.8, ge=0.0)
    blood_hu_mean: float = 47.0  # core density of a bleed (normal, clipped to blood_hu)
    blood_hu_sd: float = Field(11.0, ge=0.0)
    blood_hu: tuple[float, float] = (30.0, 85.0)
    oedema_hu: float = Field(5.0, ge=0.0)  # darkening of the rim around a parenchymal bleed
    fracture_rate_positive: float = Field(0.52, ge=0.0, le=1.0)  # share of bleeds with a fracture over them
    fracture_rate_negative: float = Field(0.025, ge=0.0, le=1.0)  # share of slices with an incidental one
    calcification_rate: float = Field(0.5, ge=0.0, le=1.0)  # share of patients with each calcified mimic
    streaks: bool = True  # streak artefacts from the dense skull base
    streak_hu: float = Field(30.0, ge=0.0)  # their amplitude
    texture_hu: float = Field(2.0, ge=0.0)  # fine brain texture (std, HU)
    noise_hu: float = Field(2.5, ge=0.0)  # correlated pixel noise (std, HU) of the final slice
    psf_mm: float = Field(0.6, ge=0.0)  # scanner blur (Gaussian sigma, mm)
    supersample: int = Field(2, ge=1, le=4)  # render at this multiple of image_size (partial volume)

    @field_validator("subtype_weights")
    @classmethod
    def _weights(cls, v):
        if len(v) != 5 or any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError(f"must be 5 non-negative weights with a positive sum, got {v}")
        return v

    @field_validator("blood_hu")
    @classmethod
    def _blood(cls, v):
        if v[0] >= v[1]:
            raise ValueError(f"must be [low, high] with low < high, got {list(v)}")
        return v


class SplitParams(_Section):
    """Patient-level split and the annotated (pixel-labelled) subset the weak path may use."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # Share of val / test patients whose masks are "annotated" (has_mask). Train masks never are.
    annotated_val_fraction: float = Field(1.0, ge=0.0, le=1.0)
    annotated_test_fraction: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 so that some patients train, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class DataParams(_Section):
    source: Literal["synthetic", "ct-ich", "ct-ich-png", "rsna", "nifti-folder"] = "synthetic"
    path: Optional[str] = None  # root folder of a real source; unused for synthetic
    image_size: int = Field(128, ge=32)  # every source is resampled to image_size x image_size
    split: SplitParams = SplitParams()
    synthetic: SyntheticParams = SyntheticParams()
    # nifti-folder: `hu` keeps stored values (CT); `percentile` maps each volume's 1st..99th percentile
    # of non-zero voxels to 0..1000 so that an MRI volume can use the windows below.
    intensity: Literal["hu", "percentile"] = "hu"
    # rsna: unreadable DICOMs are skipped and listed; above this share prepare fails.
    max_unreadable_fraction: float = Field(0.01, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _path_for_real_sources(self):
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"source '{self.source}' reads files: set data.path to its root folder")
        return self


# ---------------------------------------------------------------------------------------------- input


class InputParams(_Section):
    """How HU slices become network channels (applied at load time, so no re-prepare)."""

    # windows: one channel per CT window of the current slice; slices: prev/current/next in one window;
    # windows_neighbours: the windows of the current slice, then prev and next in slice_window (2.5D).
    mode: Literal["windows", "slices", "windows_neighbours"] = "windows"
    windows: list[Window] = Field(default_factory=lambda: [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)])
    slice_window: Window = (25.0, 130.0)
    # CT: maps and segmenter masks are kept to the intracranial region found from HU alone
    # (weak2full.brain), so a peak on a skull fracture, a shortcut of real CT, cannot become a label.
    # Needs HU data (data.intensity: hu).
    brain_mask: bool = True
    # CT: the network sees only the intracranial region (the rest set to air, -1000 HU) in training and
    # inference alike: skull stripping, so a fracture in the bone cannot become the evidence it learns.
    # Needs HU data (data.intensity: hu).
    skull_strip: bool = False
    # The windows of the segmenter and the oracle (null: the same as ``windows``). Drawing a faint bleed
    # needs a narrower window than finding it: a 40/40 fourth window lifted the oracle from .603 to .633
    # on the cohort but cost the classifier AUROC .887 -> .793 (docs/TUNING.md, Session 8), so the two
    # kinds of network get their own. The oracle always shares the segmenter's input, so the ceiling
    # stays comparable.
    segmenter_windows: Optional[list[Window]] = Field(
        default_factory=lambda: [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0), (40.0, 40.0)])

    @field_validator("windows")
    @classmethod
    def _windows(cls, v):
        return _check_windows(v)

    @field_validator("segmenter_windows")
    @classmethod
    def _segmenter_windows(cls, v):
        return None if v is None else _check_windows(v)

    @field_validator("slice_window")
    @classmethod
    def _slice_window(cls, v):
        return _check_window(v)

    @property
    def in_channels(self) -> int:
        if self.mode == "slices":
            return 3
        return len(self.windows) + (2 if self.mode == "windows_neighbours" else 0)

    def for_segmenter(self) -> "InputParams":
        """The input of the segmenter and the oracle: these params with ``segmenter_windows`` as the
        windows. Their checkpoints store this form, so evaluation rebuilds exactly what they saw."""
        if self.segmenter_windows is None:
            return self
        return self.model_copy(update={"windows": self.segmenter_windows, "segmenter_windows": None})


# ------------------------------------------------------------------------------------------- training


class AugmentParams(_Section):
    hflip: float = Field(0.5, ge=0.0, le=1.0)  # probability (heads are roughly left-right symmetric)
    affine: float = Field(0.5, ge=0.0, le=1.0)  # probability of a small affine
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    scale: float = Field(0.1, ge=0.0, lt=1.0)  # +- relative zoom
    shift: float = Field(0.05, ge=0.0, lt=0.5)  # +- fraction of the side
    intensity_hu: float = Field(3.0, ge=0.0)  # +- HU offset added before windowing
    noise_hu: float = Field(2.0, ge=0.0)  # std of extra Gaussian noise in HU
    # Probability of cutting a fracture-like gap through the skull at a random angle (data.skull_gap):
    # fractures accompany bleeds, and a classifier learns to point at them; gaps on any slice break that.
    skull_gap: float = Field(0.0, ge=0.0, le=1.0)


class TrainParams(_Section):
    """Knobs of the one training loop (weak2full.train), shared by every network."""

    epochs: int = Field(10, ge=1)
    steps_per_epoch: Optional[int] = Field(None, ge=1)  # None: one pass over the train split
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    # Balanced sampling: share of positive slices in each batch (None: the data's own share).
    positive_fraction: Optional[float] = Field(0.5, ge=0.0, le=1.0)
    augment: AugmentParams = AugmentParams()
    num_workers: int = Field(0, ge=0)
    amp: bool = True  # bf16 autocast in training where native (CUDA; AVX512-BF16 or AMX CPUs)
    channels_last: bool = True  # NHWC weights and batches in training
    resume: bool = True  # continue from the stage's last checkpoint after an interruption
    # Per-epoch validation (model selection) reads all annotated val positives plus this many annotated
    # val negatives per positive, drawn once with the seed (None: every annotated val slice). The
    # selection scores (map_dice, point_acc, dice_pos) read positives only; the negatives serve the
    # logged AUROC and fp_slice_rate, so this ratio costs time without moving the chosen epoch (the
    # default was 4 until test_scale made validation dearer). The final metrics use whole splits.
    val_negative_ratio: Optional[float] = Field(1.0, ge=0.0)
    # Exponential moving average of the weights (timm's ModelEmaV3, with its warm-up): validated, selected
    # and saved in place of the raw weights, which a few hundred noisy steps leave far from settled.
    # 0 turns it off.
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)


class ClassifierParams(TrainParams):
    # Defaults sized for the 15-minute CPU budget of the whole chain (about 4 minutes here): 300 steps
    # of 16 slices, half of them positive, with a light encoder and a narrow decoder.
    epochs: int = Field(6, ge=1)
    steps_per_epoch: Optional[int] = Field(50, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    encoder: str = "resnet10t"  # any timm model name with features_only support
    encoder_weights: Optional[str] = None  # None: random init; else a local weights file
    # Widths of the decoder blocks from the deepest feature up; the last repeats until the map's stride.
    decoder_channels: list[int] = Field(default_factory=lambda: [64, 32, 16, 16], min_length=1)
    heatmap_size: int = Field(128, ge=4)  # side of the class maps; input side / heatmap_size = stride
    pooling: Literal["lse", "max", "topk"] = "lse"
    lse_r: float = Field(6.0, gt=0.0)  # log-sum-exp sharpness (learnable, this is its start)
    topk_fraction: float = Field(0.02, gt=0.0, le=1.0)
    deep_supervision: bool = True
    deep_supervision_weight: float = Field(0.5, ge=0.0)
    consistency_weight: float = Field(0.1, ge=0.0)
    # Maps are read off the slice enlarged this many times (models.heatmap.HeatmapNet.forward, in eval
    # mode only: validation, cams and metrics; training stays at the input size). Costs its square in
    # inference time; measured in docs/TUNING.md.
    test_scale: float = Field(2.0, gt=0.0, le=4.0)
    # The same enlargement in training (then the map is also learnt on the enlarged slice): costs its
    # square in training time.
    train_scale: float = Field(1.0, gt=0.0, le=4.0)
    # In eval mode, maps and image logits averaged with those of the left-right mirrored slice (twice
    # the inference time). Off: it lifted the maps on the cohort but not the pseudo-masks (TUNING.md).
    test_flip: bool = False
    # BCE of every map pixel against 0 on slices labelled negative (losses.heatmap_loss): what all
    # slices show, such as the brain's rim, then cannot stay warm on the positive ones.
    negative_pixel_weight: float = Field(0.0, ge=0.0)
    # Checkpoint selection: localisation on annotated val slices (AUROC can be won by shortcuts).
    select_by: Literal["point_acc", "map_dice", "auroc"] = "map_dice"
    # Published methods as options (docs/METHODS.md has each one's source and measured effect).
    # pylon: PYLON's decoder (pyramid attention + 1x1-skip upsampling, map at stride 4, upsampled to
    # heatmap_size by cams; width decoder_channels[0]). The published PYLON also sets pooling: max and
    # deep_supervision: false.
    decoder: Literal["unet", "pylon"] = "unet"
    # gru / attention: fuse the deepest encoder features of context_slices neighbouring slices of the
    # same patient into the classified slice's (ResNet-LSTM idea); labels and maps stay per slice.
    slice_context: Literal["none", "gru", "attention"] = "none"
    context_slices: int = Field(5, ge=3)  # odd: the classified slice and (n-1)/2 on each side
    # Min-max entropy (Belharbi et al.): the map's masked-in image must be classified confidently, its
    # masked-out remainder must leave the classifier uncertain. 0 switches it off.
    minmax_entropy_weight: float = Field(0.0, ge=0.0)

    @field_validator("context_slices")
    @classmethod
    def _odd(cls, v):
        if v % 2 == 0:
            raise ValueError(f"must be odd (the classified slice in the middle), got {v}")
        return v


class BaselineParams(TrainParams):
    epochs: int = Field(4, ge=1)
    steps_per_epoch: Optional[int] = Field(45, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    encoder: str = "resnet10t"  # the heatmap network's encoder: the comparison is about the map
    encoder_weights: Optional[str] = None
    select_by: Literal["point_acc", "map_dice", "auroc"] = "map_dice"


class CamsParams(_Section):
    batch_size: int = Field(32, ge=1)
    chunk_size: int = Field(256, ge=1)  # slices read, run and written at a time: bounds memory
    # Each slice's image logit averaged with its two neighbours' at this weight each (0: the slice alone);
    # only the image probabilities (slice ranking, the cascade's gate), not the maps.
    neighbour_weight: float = Field(0.5, ge=0.0)


# ---------------------------------------------------------------------------------------- pseudo masks


class CRFParams(_Section):
    enabled: bool = True
    window: Window = (40.0, 80.0)  # the bilateral kernel compares intensities in this HU window
    iterations: int = Field(5, ge=1)
    gaussian_sxy: float = Field(3.0, gt=0.0)
    gaussian_compat: float = Field(3.0, ge=0.0)
    # In pixels at image resolution. A median bleed is ~70 px at 128^2 (radius ~5): measured on the default
    # data, 3 keeps the CRF's test Dice at the raw map's (0.28), 10 drags it to 0.15 (bleeds leak out).
    bilateral_sxy: float = Field(3.0, gt=0.0)
    bilateral_srgb: float = Field(10.0, gt=0.0)  # in 0..255 units of the windowed image
    # Bilateral kernel weight. On the default data the pseudo-masks' val Dice rises with it up to ~30 and
    # is flat beyond (docs/TUNING.md, Session 10: 0.43 at 3, 0.63 at 10, 0.67 at 30, 0.68 at 100);
    # calibration searches it.
    compat: float = Field(30.0, ge=0.0)
    # Probabilities are clipped to this floor before -log: bounds the unary of a pixel whose map is 0.
    unary_clip: float = Field(1e-5, gt=0.0, lt=0.5)

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        return _check_window(v)


class CalibrationParams(_Section):
    fg_grid: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    bg_grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    compat_grid: list[float] = Field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])

    @field_validator("fg_grid", "bg_grid")
    @classmethod
    def _unit(cls, v):
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"must be a non-empty list of values in [0, 1], got {v}")
        return v

    @field_validator("compat_grid")
    @classmethod
    def _compat(cls, v):
        if not v or any(x < 0.0 for x in v):
            raise ValueError(f"must be a non-empty list of bilateral weights >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _some_band(self):
        if not any(f > b for f in self.fg_grid for b in self.bg_grid):
            raise ValueError(
                f"no grid point has fg > bg (fg_grid={self.fg_grid}, bg_grid={self.bg_grid}); "
                "calibration would have nothing to search"
            )
        return self


class PseudoMaskParams(_Section):
    thresholds: Literal["calibrated", "fixed"] = "calibrated"
    # Thresholds on the normalised map (rule: weak2full.pseudo_masks.make_pseudo_mask). Below bg: background
    # (the CRF may not add foreground there). Raw mask: at or above fg foreground, between: ignore (255).
    # With the CRF on, the CRF places foreground where the map is >= bg and the rest there is ignored.
    fg: float = Field(0.5, ge=0.0, le=1.0)
    bg: float = Field(0.1, ge=0.0, le=1.0)
    crf: CRFParams = CRFParams()
    calibration: CalibrationParams = CalibrationParams()
    # Share of the label-positive train slices, those whose map peaks lowest (the highest raw map value
    # over the labelled classes), marked untrusted: the segmenter does not train on them. A weak peak is
    # most often off the bleed, so its mask teaches a false bleed and calls the true one background
    # (docs/TUNING.md). The cut-off found on train applies to every split. 0 trusts every slice.
    untrusted_fraction: float = Field(0.4, ge=0.0, lt=1.0)
    workers: int = Field(0, ge=0)  # 0: all cores
    chunk_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _band(self):
        if self.fg <= self.bg:
            raise ValueError(f"fg must be greater than bg, got fg={self.fg} and bg={self.bg}")
        return self


# ------------------------------------------------------------------------------------------ segmenter


class SegmenterParams(TrainParams):
    # 480 steps on 64x64 patches (128x128 inside the network, upsample 2): about 1.5x the compute of the
    # 320 whole-slice steps they replaced, +0.13 dice_pos on 100 held-out patients (docs/TUNING.md).
    epochs: int = Field(4, ge=1)
    steps_per_epoch: Optional[int] = Field(120, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    arch: str = "Unet"  # any segmentation-models-pytorch architecture
    encoder: str = "resnet18"  # smp encoder name, or "tu-<timm name>"
    encoder_weights: Optional[str] = None
    # Unet-family decoder widths, one per decoder block (None: the architecture's default, 256..16,
    # which costs about 1.5x the compute of this narrower one at 128x128).
    decoder_channels: Optional[list[int]] = Field(default_factory=lambda: [128, 64, 32, 16, 16])
    dice_weight: float = Field(1.0, ge=0.0)  # loss = CE/BCE + dice_weight * Dice (ignore 255)
    # Dice term per slice (what dice_pos scores: small bleeds weigh as much as large) or over the batch.
    dice_per_slice: bool = True
    # BCE on each slice's highest logit against "holds foreground": penalises specks on negative slices.
    slice_weight: float = Field(0.0, ge=0.0)
    # Train on crop_size x crop_size patches (None: whole slices), a window around a foreground pixel on
    # slices that have one (albumentations' CropNonEmptyMaskIfExists); validation and inference see whole
    # slices. Patches cost a fraction of a slice, so the same minutes buy several times the steps.
    crop_size: Optional[int] = Field(64, ge=16)
    # The network runs on slices enlarged this many times and its logits are pooled back to the slice
    # grid (weak2full.models.segmenter.Upsampled): more cells per small bleed, upsample^2 x the compute.
    upsample: int = Field(2, ge=1, le=4)
    # Which epoch is kept: the last one, where the cosine schedule ends (nnU-Net keeps its final
    # checkpoint too), or the best val dice_pos. The val Dice of some 40 positive slices moves by more
    # than the epochs differ: picking by it kept the oracle's first epoch (val .612 against the last's
    # .599), which read .518 on the cohort against the last epoch's .633 (docs/TUNING.md, Session 8).
    select_by: Literal["last", "dice_pos"] = "last"


class OracleParams(SegmenterParams):
    enabled: bool = True  # the fully supervised ceiling; off for users without train masks


# ------------------------------------------------------------------------------------------- pretrain

# `encoder_weights: synthetic` starts a network from the pretrain stage's weights (weak2full.pretrain).
SYNTHETIC_WEIGHTS = "synthetic"


class PretrainNetParams(TrainParams):
    """Schedule of one network's synthetic pretraining (the one training loop), strong augmentation:
    the affine draws head size and pose, the intensity terms scanner offset and noise."""

    epochs: int = Field(5, ge=1)
    steps_per_epoch: Optional[int] = Field(60, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    augment: AugmentParams = AugmentParams(affine=0.9, rotate_deg=25.0, scale=0.25, shift=0.1,
                                           intensity_hu=8.0, noise_hu=3.0)


def _default_randomise() -> dict[str, tuple[float, float]]:
    # Generator settings drawn per pretraining volume (uniform in [low, high]); the others stay at the
    # SyntheticParams defaults. params.shifted.yaml tests outside these ranges.
    return {
        "noise_hu": (1.0, 4.0),
        "psf_mm": (0.3, 0.9),
        "texture_hu": (1.0, 3.0),
        "blood_hu_mean": (44.0, 60.0),
        "area_median": (0.5, 1.4),
        "extra_lesions": (0.1, 0.8),
        "oedema_hu": (2.0, 8.0),
        "streak_hu": (0.0, 50.0),
        "calcification_rate": (0.2, 0.8),
        "fracture_rate_positive": (0.2, 0.6),
        "fracture_rate_negative": (0.0, 0.05),
    }


class PretrainParams(_Section):
    """Synthetic pretraining of the heatmap network's and the segmenter's encoders (weak2full.pretrain).

    Off by default; when on, the training stages whose ``encoder_weights`` is ``synthetic`` start from it.
    """

    enabled: bool = False
    # Seeds of the pretraining volumes are seed .. seed + volumes + val_volumes - 1: never the data's.
    seed: int = Field(10_000, ge=0)
    volumes: int = Field(80, ge=2)  # synthetic patients to train on, each with its own generator draw
    val_volumes: int = Field(8, ge=1)  # held out (same ranges) to pick the epoch
    slices_per_volume: int = Field(24, ge=3)
    positive_volume_fraction: float = Field(0.6, gt=0.0, lt=1.0)
    randomise: dict[str, tuple[float, float]] = Field(default_factory=_default_randomise)
    contrast: tuple[float, float] = (0.8, 1.25)  # per-sample HU contrast scale about the first window's level
    dice_weight: float = Field(1.0, ge=0.0)  # segmentation term: BCE + dice_weight x Dice
    cls_weight: float = Field(0.5, ge=0.0)  # image-level BCE (heatmap: pooled logit; segmenter: its head)
    fp_weight: float = Field(1.0, ge=0.0)  # hinge on a negative slice's largest pixel logit (gated)
    classifier: PretrainNetParams = PretrainNetParams()
    segmenter: PretrainNetParams = PretrainNetParams()

    @field_validator("randomise")
    @classmethod
    def _ranges(cls, v):
        # set by the pretrain stage itself, not drawn
        fixed = {"patients", "slices_per_patient", "supersample", "positive_patient_fraction"}
        numeric = {k for k, f in SyntheticParams.model_fields.items()
                   if f.annotation in (float, int) and k not in fixed}
        for key, (lo, hi) in v.items():
            if key not in numeric:
                raise ValueError(
                    f"'{key}' is not a numeric data.synthetic setting (one of {sorted(numeric)})"
                )
            if lo > hi:
                raise ValueError(f"'{key}' must be [low, high] with low <= high, got {[lo, hi]}")
            try:
                SyntheticParams(**{key: lo}), SyntheticParams(**{key: hi})
            except ValidationError as exc:
                raise ValueError(f"'{key}' range {[lo, hi]} leaves its valid values: "
                                 f"{exc.errors()[0]['msg']}") from None
        return v

    @field_validator("contrast")
    @classmethod
    def _contrast(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(v)}")
        return v


# ------------------------------------------------------------------------------------- evaluate/export


class EvaluateParams(_Section):
    """Scoring on the annotated test slices (weak2full.metrics) and the report (weak2full.report)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # probability threshold for segmenter/oracle masks
    # true: segmenter and oracle thresholds are chosen on the annotated val slices from threshold_grid,
    # as the maps' are (the same rule for both, so weak_over_full stays fair); false: ``threshold``.
    calibrate_threshold: bool = True
    # ... and among the thresholds whose val dice_pos is within this of the best, the highest is taken:
    # the segmenter's Dice barely moves from 0.1 to 0.8 while the normal slices it marks fall from 62% to
    # 27% (cohort, docs/TUNING.md Session 8), and 40 val slices cannot tell near-equal thresholds apart.
    threshold_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    # Thresholds of the dice-vs-threshold curves (plots/dice_vs_threshold.csv), the same for every method.
    threshold_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    batch_size: int = Field(32, ge=1)
    # Segmenter and oracle masks from the mean logits of each slice and its left-right mirror (both
    # alike, so weak_over_full stays fair): twice their inference time.
    flip_tta: bool = True
    report_examples: int = Field(3, ge=1)  # overlays for best, median, worst (this many each)
    # The ``cascade`` row gates the segmenter with the heatmap classifier's slice probability: the
    # strictest gate that keeps this share of the segmenter's val dice_pos (1.0: no bleed given up).
    cascade_keep_dice: float = Field(0.95, ge=0.0, le=1.0)
    # 95% intervals of dice_pos and weak_over_full from this many resamples of the test patients (0: none).
    # A default test split holds 12 patients: its figures move by tenths between two draws of the data.
    bootstrap_resamples: int = Field(2000, ge=0)

    @field_validator("threshold_grid")
    @classmethod
    def _grid(cls, v):
        if not v or any(not 0.0 < x < 1.0 for x in v):
            raise ValueError(f"must be a non-empty list of probabilities in (0, 1), got {v}")
        if sorted(set(v)) != list(v):
            raise ValueError(f"must be strictly increasing, got {v}")
        return v


class ExportParams(_Section):
    name: str = Field("synthetic-ich-pseudo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    nifti: bool = True  # also one NIfTI volume per patient


# -------------------------------------------------------------------------------------------- the file


class Params(_Section):
    common: CommonParams = CommonParams()
    data: DataParams = DataParams()
    input: InputParams = InputParams()
    train_classifier: ClassifierParams = ClassifierParams()
    baseline_cam: BaselineParams = BaselineParams()
    cams: CamsParams = CamsParams()
    pseudo_masks: PseudoMaskParams = PseudoMaskParams()
    train_segmenter: SegmenterParams = SegmenterParams()
    train_oracle: OracleParams = OracleParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    pretrain: PretrainParams = PretrainParams()

    @model_validator(mode="after")
    def _same_start(self):
        """``encoder_weights: synthetic`` needs the pretrain stage, and compared networks share a start."""
        syn = {s: getattr(self, s).encoder_weights == SYNTHETIC_WEIGHTS
               for s in ("train_classifier", "baseline_cam", "train_segmenter", "train_oracle")}
        if any(syn.values()) and not self.pretrain.enabled:
            on = [s for s, v in syn.items() if v]
            raise ValueError(f"{', '.join(f'{s}.encoder_weights' for s in on)} is 'synthetic' but "
                             "pretrain.enabled is false: turn pretraining on, or set them to null")
        if self.pretrain.enabled and not any(syn.values()):
            raise ValueError("pretrain.enabled is true but no stage's encoder_weights is 'synthetic': the "
                             "weights would be made and never used")
        pairs = [("train_classifier", "baseline_cam", "the GAP-CAM baseline is compared with the heatmap")]
        if self.train_oracle.enabled:
            pairs.append(("train_segmenter", "train_oracle", "weak_over_full compares the two"))
        for a, b, why in pairs:
            wa, wb = getattr(self, a).encoder_weights, getattr(self, b).encoder_weights
            if (syn[a] or syn[b]) and wa != wb:
                raise ValueError(f"{a}.encoder_weights ({wa!r}) and {b}.encoder_weights ({wb!r}) must be the "
                                 f"same start ({why})")
            if syn[a] and syn[b] and getattr(self, a).encoder != getattr(self, b).encoder:
                raise ValueError(f"{a}.encoder ({getattr(self, a).encoder!r}) and {b}.encoder "
                                 f"({getattr(self, b).encoder!r}) must match to share the synthetic weights")
        if self.pretrain.enabled and self.data.source == "synthetic":
            first = self.pretrain.seed
            last = first + self.pretrain.volumes + self.pretrain.val_volumes - 1
            if first <= self.common.seed <= last:
                raise ValueError(f"common.seed {self.common.seed} lies in the pretraining seeds "
                                 f"{first}..{last} (pretrain.seed): the evaluation data must not be drawn "
                                 "from them")
        return self

    @model_validator(mode="after")
    def _brain_mask_needs_hu(self):
        for key in ("brain_mask", "skull_strip"):
            if getattr(self.input, key) and self.data.intensity != "hu":
                raise ValueError(
                    f"input.{key} finds the skull by its Hounsfield units, but data.intensity is "
                    f"'{self.data.intensity}' (not CT): set input.{key} to false"
                )
        return self


def _describe(err: dict[str, Any], owner: Path) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = ".".join(str(p) for p in err["loc"][:-1]) or "the top level"
        return f"Unknown key '{key}' in {owner} (not a parameter of {parent})."
    got = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not key:  # a rule across sections (e.g. Params._same_start): the message names the keys
        return f"{owner}: {msg}."
    where = f"The '{key}' parameter"
    return f"{where} in {owner}: {msg}. Got {got!r} instead."


def parse_params(raw: Any, owner: str | Path = "params.yaml") -> Params:
    """Validate a parsed YAML mapping; raise InvalidParameterError naming every bad key."""
    owner = Path(owner)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidParameterError(f"{owner} must hold a mapping of sections, got {type(raw).__name__}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, owner) for e in exc.errors()]
        raise InvalidParameterError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"Params file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidParameterError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, path)
