"""Per-stage cost of the chain at RSNA size, extrapolated from a bench run (bench/results/latest.json).

    python bench/scale.py                                   # 750,000 slices at 512², 1 and 8 GPUs
    python bench/scale.py --gpu-tflops 50 --gpus 1 4 --cores-per-gpu 8

Nothing here is measured: it is arithmetic on what run_all.py measured, under assumptions given as
flags and printed with the table.

* Measured (in latest.json): FLOPs of one forward pass per network and input size (counted by
  torch's FlopCounterMode), CPU ms per training sample of the data path at 512² (HDF5 read, augment,
  window; ``loader_cpu_ms``), CPU ms per slice of the pseudo_masks stage at 512² with a 128² map
  (``input_512_stride4.pseudo_masks``), and this CPU's images/s at 512².
* Assumed: the GPU's sustained rate on these small convolutional networks (``--gpu-tflops``, default
  100 TFLOP/s of bf16: about 10% of an H100's dense peak, as small-channel convolutions with BatchNorm
  reach), training = 3x the forward FLOPs, ``--cores-per-gpu`` CPU cores feeding each GPU (16: the
  machine the device tool lends), DDP scaling efficiency ``--ddp-efficiency``, the share of positive
  slices (``--positive``, RSNA: 14%; only positive slices run the CRF; a negative slice costs its read
  and write, ``plain`` loader ms).

A stage on GPUs takes the longer of its GPU time and its CPU (data) time; pseudo_masks is CPU only
and splits across all ranks' cores (torchrun). Training is given per epoch over all slices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def estimate(res: dict, slices: int, gpus: int, gpu_tflops: float, cores: int, eff: float, positive: float,
             size: int = 512) -> list[tuple[str, float, float, float]]:
    """(stage, GPU-bound seconds, CPU-bound seconds, estimate) per stage on ``gpus`` GPUs."""
    flop = {k: v * 1e9 for k, v in res["scale_inputs"]["forward_gflop"].items()}
    loader = res["scale_inputs"]["loader_cpu_ms"]
    crf_ms = res["input_512_stride4"]["pseudo_masks"]["cpu_ms_per_slice"]["stage_pool"]
    rate = gpu_tflops * 1e12 * gpus * (eff if gpus > 1 else 1.0)
    cpu = cores * gpus
    rows = []
    for stage, net, mult, data_ms in (
        ("train_classifier (1 epoch)", "classifier", 3, loader[f"augmented_{size}"]),
        ("baseline_cam (1 epoch)", "gap_cam", 3, loader[f"augmented_{size}"]),
        ("cams@heatmap", "classifier", 1, loader[f"plain_{size}"]),
        ("train_segmenter (1 epoch)", "segmenter", 3, loader[f"augmented_{size}"]),
    ):
        g = slices * mult * flop[f"{net}_{size}"] / rate
        c = slices * data_ms / 1000 / cpu
        rows.append((stage, g, c, max(g, c)))
    c = (slices * positive * crf_ms + slices * (1 - positive) * 2 * loader[f"plain_{size}"]) / 1000 / cpu
    rows.insert(3, ("pseudo_masks (CPU only)", 0.0, c, c))
    return rows


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "latest.json")
    ap.add_argument("--slices", type=int, default=750_000)
    ap.add_argument("--positive", type=float, default=0.14)
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--gpu-tflops", type=float, default=100.0)
    ap.add_argument("--cores-per-gpu", type=int, default=16)
    ap.add_argument("--ddp-efficiency", type=float, default=0.9)
    args = ap.parse_args()
    res = json.loads(args.results.read_text())
    x = res["input_512_stride4"]
    here = res["machine"]["usable_cpus"]
    # This CPU: the measured 512² rates; pseudo_masks from its CPU cost per slice (the bench's slices are
    # all positive, RSNA's are not), spread over this machine's cores.
    pm = estimate(res, args.slices, 1, args.gpu_tflops, here, 1.0, args.positive)[3][3]
    cpu_seconds = {"train_classifier (1 epoch)": args.slices / x["train_classifier"]["img_per_s"],
                   "cams@heatmap": args.slices / x["cams"]["cams_img_per_s"],
                   "pseudo_masks (CPU only)": pm}
    tables = {g: estimate(res, args.slices, g, args.gpu_tflops, args.cores_per_gpu, args.ddp_efficiency,
                          args.positive) for g in args.gpus}
    print(f"{args.slices:,} slices at 512² (stride-4 128² map), {args.positive:.0%} positive; assumed "
          f"{args.gpu_tflops:g} TFLOP/s sustained per GPU, {args.cores_per_gpu} cores per GPU, "
          f"DDP efficiency {args.ddp_efficiency:g}; from {args.results.name} ({res['mode']}, "
          f"{res['machine']['date']})\n")
    head = ["stage", f"this CPU ({here} cores, from the measured 512² figures)"]
    for g in args.gpus:
        head.append(f"{g} GPU{'s' if g > 1 else ''}: GPU / CPU-data bound → estimate")
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for i, (stage, *_rest) in enumerate(tables[args.gpus[0]]):
        cells = [stage]
        cells.append(_fmt(cpu_seconds[stage]) if stage in cpu_seconds else "not measured at 512²")
        for g in args.gpus:
            _, gpu_s, cpu_s, est = tables[g][i]
            cells.append(f"{_fmt(gpu_s) if gpu_s else '–'} / {_fmt(cpu_s)} → **{_fmt(est)}**")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
