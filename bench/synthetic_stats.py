"""Print the synthetic generator's statistics next to DESIGN.md's real CT-ICH figures.

    python bench/synthetic_stats.py                      # default params (params.py), 128 px, seed 0
    python bench/synthetic_stats.py --params params.yaml --seed 1 --montage /tmp/synth_montage.png

The statistics are measured by ``weak2full.synthetic.summary_statistics`` (its docstring defines each).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from weak2full.params import SyntheticParams, load_params
from weak2full.synthetic import generate, summary_statistics

# DESIGN.md, "What real CT-ICH looks like" (2,814 slices, 75 patients). None: not given there.
REAL = {
    "positive_slices": 0.11,
    "positive_patients": 0.48,
    "span": [2, 6, 14],
    "area_pct": [0.10, 0.20, 0.42, 0.85, 1.6],
    "components": [None, 2],
    "blood_hu": [39, 55, 68],
    "brain_hu": [None, 37, None],
    "contrast_hu": [6, 17, 30],
    "level_fifths": [0.003, 0.10, 0.26, 0.19, 0.03],
    "fracture_pos": 0.38,
    "fracture_neg": 0.03,
    "texture_hu": 3.0,
}
ROWS = [
    ("positive_slices", "share of positive slices", ""),
    ("positive_patients", "share of positive patients", ""),
    ("span", "bleed span, consecutive slices", "p10/50/90"),
    ("area_pct", "lesion area per positive slice, %", "p10/25/50/75/90"),
    ("components", "components per positive slice", "p50/90"),
    ("blood_hu", "blood HU (mean in mask)", "p10/50/90"),
    ("brain_hu", "neighbouring brain HU", "p10/50/90"),
    ("contrast_hu", "contrast blood - brain, HU", "p10/50/90"),
    ("level_fifths", "positive share by level fifth", "base..vertex"),
    ("fracture_pos", "fracture on positive slices", ""),
    ("fracture_neg", "fracture on negative slices", ""),
    ("texture_hu", "brain texture, std in 5x5, HU", "median"),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return " / ".join(_fmt(x) for x in v)
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def table(stats: dict) -> str:
    head = f"| {'statistic':<34} | {'which':<15} | {'synthetic':<34} | {'real CT-ICH':<28} |"
    lines = [head, f"|{'-' * 36}|{'-' * 17}|{'-' * 36}|{'-' * 30}|"]
    for key, name, which in ROWS:
        lines.append(f"| {name:<34} | {which:<15} | {_fmt(stats[key]):<34} | {_fmt(REAL[key]):<28} |")
    return "\n".join(lines)


def montage(data, path: str, n: int = 24) -> None:
    """Brain-window (40/80) montage: a few levels of one patient, then positive slices with mask outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = np.flatnonzero(data.patient == data.patient[0])
    rows = list(first[:: max(1, len(first) // 6)][:6])
    pos = np.flatnonzero(data.label[:, 0])
    rows += list(pos[:: max(1, len(pos) // (n - len(rows)))][: n - len(rows)])
    cols = 6
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(cols * 2.6, -(-len(rows) // cols) * 2.8))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, rows):
        ax.imshow(np.clip((data.image[i] - 0.0) / 80.0, 0, 1), cmap="gray", vmin=0, vmax=1)
        if data.mask[i].any():
            ax.contour(data.mask[i] > 0, [0.5], colors="red", linewidths=0.7)
        kinds = ",".join(data.mask_classes[k - 1][:4] for k in np.unique(data.mask[i]) if k)
        frac = " fx" if data.fracture[i] else ""
        ax.set_title(f"p{data.patient[i]} s{data.slice[i]} {kinds}{frac}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", help="a params.yaml to take data.synthetic and data.image_size from")
    ap.add_argument("--image-size", type=int, default=None, help="default: params' data.image_size or 128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--montage", help="also save a brain-window montage PNG here")
    args = ap.parse_args(argv)
    if args.params:
        data = load_params(args.params).data
        p, size = data.synthetic, data.image_size
    else:
        p, size = SyntheticParams(), 128
    size = args.image_size or size
    t0 = time.perf_counter()
    data = generate(p, size, args.seed)
    seconds = time.perf_counter() - t0
    print(f"{len(data.image)} slices ({p.patients} patients x {p.slices_per_patient}) at {size}x{size}, "
          f"seed {args.seed}: generated in {seconds:.1f} s\n")
    print(table(summary_statistics(data)))
    if args.montage:
        montage(data, args.montage)
        print(f"\nmontage: {args.montage}")


if __name__ == "__main__":
    main()
