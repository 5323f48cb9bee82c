"""Training throughput: images/s of the one training loop for the default networks, DataLoader workers tuned.

    python bench/bench_train.py              # classifier + segmenter, 128 and 256, workers 0/1/2
    python bench/bench_train.py --nets classifier --sizes 512 --workers 0 --steps 3
    python bench/bench_train.py --workers 0 --fp32   # without bf16 autocast, for comparison

What runs is ``weak2full.train.fit`` itself (balanced sampler, HDF5 read by the lazily opened
SliceDataset, default augmentation, AdamW step), with the default params of ``train_classifier``
(heatmap network, resnet10t, 128x128 map: stride 1 at 128, 2 at 256, 4 at 512) and of
``train_segmenter`` (smp Unet resnet18), batch 16, channels_last, and bf16 autocast where the CPU
computes bf16 natively (``weak2full.runtime.fast_bf16``; ``--fp32`` turns it off). The loss function
stamps the time of every step; images/s = batch x (timed steps) / (time from the end of the warm-up
steps to the last step), so DataLoader start-up and the epoch's validation are not counted. Threads:
torch's default intra-op threads in this process; DataLoader workers are separate processes competing
for the same cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, make_dataset  # noqa: E402

from weak2full import losses  # noqa: E402
from weak2full.data import SliceDataset  # noqa: E402
from weak2full.models import create_model, model_config  # noqa: E402
from weak2full.params import load_params, parse_params  # noqa: E402
from weak2full.runtime import fast_bf16  # noqa: E402
from weak2full.train import fit  # noqa: E402

NETS = ("classifier", "segmenter")


def throughput(net: str, dataset: Path, size: int, workers: int, steps: int, warmup: int = 2,
               amp: bool = True) -> dict:
    """images/s of ``steps`` timed training steps of ``net`` on ``dataset`` (after ``warmup`` steps)."""
    section = "train_classifier" if net == "classifier" else "train_segmenter"
    params = parse_params({section: {"num_workers": workers, "epochs": 1, "steps_per_epoch": warmup + steps,
                                     "resume": False, "amp": amp}})
    p = getattr(params, section)
    ip = params.input if net == "classifier" else params.input.for_segmenter()
    torch.manual_seed(0)
    if net == "classifier":
        arch, targets = "heatmap", "label"
        config = model_config(arch, p, ip.in_channels, 1, size)

        def loss(out, y):
            return losses.heatmap_loss(out, y, p.deep_supervision_weight, p.consistency_weight)
    else:
        arch, targets = "segmenter", "oracle"
        config = model_config(arch, p, ip.in_channels, 1, 0)

        def loss(out, y):
            return losses.segmentation_loss(out, y, p.dice_weight)

    model = create_model(arch, config)
    train_set = SliceDataset(dataset, np.arange(_rows(dataset)), ip, ["any"], targets, p.augment)
    stamps = []

    def timed_loss(out, y):
        stamps.append(time.perf_counter())
        return loss(out, y)

    fit(model, train_set, timed_loss, lambda m: {"score": 0.0}, p, select_key="score", seed=0,
        device=torch.device("cpu"), live_dir=None, state_path=None, desc=f"{net} {size}")
    # stamps[i] is taken when step i's forward has produced its output; steps warmup..end are timed.
    seconds = (stamps[-1] - stamps[warmup - 1]) * steps / (len(stamps) - warmup)
    return {"net": net, "arch": config.get("arch", arch), "encoder": config["encoder"], "input": size,
            "batch_size": p.batch_size, "num_workers": workers,
            "bf16": amp and fast_bf16(torch.device("cpu")),
            "timed_steps": steps, "img_per_s": p.batch_size * steps / seconds, "load": load()}


def flops(net: str, size: int, preset: Path | None = None) -> float:
    """Floating-point operations of one forward pass of one image (torch's FlopCounterMode), the network
    built as ``preset`` (a params file; None: the defaults) builds it, in eval mode, so a network that
    reads slices enlarged (``test_scale``, ``upsample``) is counted at the enlarged size."""
    from torch.utils.flop_counter import FlopCounterMode

    params = load_params(preset) if preset is not None else parse_params({})
    arch, p = {"classifier": ("heatmap", params.train_classifier),
               "gap_cam": ("gap_cam", params.baseline_cam),
               "segmenter": ("segmenter", params.train_segmenter)}[net]
    p = p.model_copy(update={"encoder_weights": None})  # the count does not depend on the weights
    channels = (params.input.for_segmenter() if net == "segmenter" else params.input).in_channels
    model = create_model(arch, model_config(arch, p, channels, 1, size)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size))
    return float(counter.get_total_flops())


def loader_ms(dataset: Path, augment: bool, n: int = 64) -> float:
    """CPU ms to read, augment (or not) and window one training sample, in this process."""
    params = parse_params({})
    ds = SliceDataset(dataset, np.arange(_rows(dataset)), params.input.for_segmenter(), ["any"], "oracle",
                      params.train_segmenter.augment if augment else None)
    ds[(0, 0)]  # opens the file
    t0 = time.process_time()
    for i in range(n):
        ds[(i % len(ds), i)]
    return 1000 * (time.process_time() - t0) / n


def _rows(dataset: Path) -> int:
    import h5py

    with h5py.File(dataset, "r") as f:
        return int(f["image"].shape[0])


def sweep(nets=NETS, sizes=(128, 256), workers=(0, 1, 2), steps: int = 6, slices: int = 256,
          warmup: int = 2, amp: bool = True) -> dict:
    """Every (net, size, workers) and, per (net, size), the best number of workers."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            dataset = make_dataset(Path(tmp) / f"d{size}.h5", slices, size, positive_fraction=0.3)
            for net in nets:
                for w in workers:
                    rows.append(throughput(net, dataset, size, w, steps, warmup, amp))
                    r = rows[-1]
                    print(f"  train {net} {size}^2 workers={w} bf16={r['bf16']}: {r['img_per_s']:.1f} img/s "
                          f"(load {r['load']})", flush=True)
    best = {}
    for r in rows:
        key = f"{r['net']}_{r['input']}"
        if key not in best or r["img_per_s"] > best[key]["img_per_s"]:
            best[key] = {"img_per_s": r["img_per_s"], "num_workers": r["num_workers"]}
    return {"rows": rows, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="*", default=list(NETS), choices=NETS)
    ap.add_argument("--sizes", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--fp32", action="store_true", help="train in float32 (amp: false)")
    args = ap.parse_args()
    res = sweep(args.nets, args.sizes, args.workers, args.steps, amp=not args.fp32)
    print(json.dumps(res["best"], indent=1))


if __name__ == "__main__":
    main()
