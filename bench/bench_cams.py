"""Benchmark of the cams stage: images/s against pytorch-grad-cam's GradCAM, and memory as N grows.

    python bench/bench_cams.py                         # 512 slices vs GradCAM; memory at 1,000 and 20,000
    python bench/bench_cams.py --slices 128 --memory-slices 500 2000 --size 256

* speed: the default heatmap network (train_classifier defaults, random weights: the cost of a forward
  does not depend on what the weights learnt), input ``--size`` (128: stride 1, the 128x128 map; 256:
  stride 2; 512: stride 4). The cams stage end to end (``weak2full.cams.run``: checkpoint load, HDF5
  in, maps out, ``cams.batch_size`` 32) against the tool a user would otherwise pick on the same
  network, input and batches: ``pytorch_grad_cam.GradCAM`` on the decoder's last block (the
  128x128-resolution features: the same map side; at the encoder's deepest stage it would be 4x4),
  target = class ``any``, inputs read from the same dataset.h5 and windowed the same way, maps kept in
  memory (not written: GradCAM gets the cheaper end). Target: cams >= 3x GradCAM. Also timed: the
  stage with the network as loaded (without ``cams.inference_model``), and GradCAM on a channels_last
  network.
* memory: the cams stage run in a fresh process per size (dataset made in another); its VmHWM peak.
  The network is a light heatmap network (``LIGHT``: timm's test_resnet encoder, decoder [16, 8],
  32x32 map) so that 20,000 slices take a minute or two on a CPU. Target: the peak at the largest size
  within 10% of the smallest.

Torch uses its default intra-op threads (printed); the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, make_dataset, peak_memory, run_child  # noqa: E402

from weak2full import cams  # noqa: E402
from weak2full.data import build_channels, source_stack  # noqa: E402
from weak2full.h5 import DatasetFile  # noqa: E402
from weak2full.models import create_model, model_config, save_checkpoint  # noqa: E402
from weak2full.params import parse_params  # noqa: E402


# A light heatmap network for the memory runs (timm's tiny test_resnet encoder, 32x32 map): the same
# kind of model and the same stage at a small share of the compute, so that 20,000 slices take a minute
# or two; the stage's memory then shows what grows with N more plainly.
LIGHT = {"encoder": "test_resnet", "decoder_channels": [16, 8], "heatmap_size": 32}


def make_checkpoint(path: Path, size: int, heatmap_size: int = 128, seed: int = 0, **overrides) -> Path:
    """The default heatmap network for ``size``x``size`` inputs (``overrides``: other train_classifier
    values), random weights, as the stage saves it."""
    params = parse_params({"train_classifier": {"heatmap_size": heatmap_size, **overrides}})
    torch.manual_seed(seed)
    config = model_config("heatmap", params.train_classifier, params.input.in_channels, 1, size)
    save_checkpoint(path, create_model("heatmap", config), "heatmap", config, ["any"],
                    input=params.input.model_dump(mode="json"), heatmap_size=heatmap_size)
    return path


class _Logits(torch.nn.Module):
    """GradCAM wants a network that returns class scores."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["logits"]


def gradcam_pass(model, dataset: Path, batch_size: int, channels_last: bool = False) -> np.ndarray:
    """GradCAM maps (N, H, W) of every slice of ``dataset`` for class 0, in batches (``channels_last``:
    model and inputs in that memory format, as a user tuning for a CPU could)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    input_params = parse_params({}).input
    out = []
    with DatasetFile(dataset) as ds, GradCAM(model=_Logits(model), target_layers=[model.blocks[-1]]) as cam:
        for start in range(0, ds.n, batch_size):
            rows = np.arange(start, min(ds.n, start + batch_size))
            x = torch.from_numpy(build_channels(source_stack(ds.h5["image"], rows, ds.patient, "windows"),
                                                input_params))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(rows)))
    return np.concatenate(out)


def speed(n: int, size: int, batch_size: int = 32, heatmap_size: int = 128,
          gradcam_channels_last: bool = True, test_scale: float | None = None) -> dict:
    """images/s of the cams stage and of GradCAM on the same network, inputs and batch size
    (``gradcam_channels_last``: also GradCAM on the network in channels_last). ``test_scale``: how
    much the network enlarges a slice before reading it (None: the train_classifier default, 2)."""
    from weak2full.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp / "dataset.h5", n, size)
        scale = {} if test_scale is None else {"test_scale": test_scale}
        ckpt = make_checkpoint(tmp / "classifier.pt", size, heatmap_size, **scale)
        params = parse_params({"common": {"device": "cpu"}, "cams": {"batch_size": batch_size}})
        # Warm-up (first-call allocations, oneDNN kernels) on a few slices, for both.
        model = load_model(ckpt)[0]
        read_at = model.test_scale
        small = make_dataset(tmp / "small.h5", batch_size, size)
        cams.run(params, ckpt, small, tmp / "warm.h5")
        gradcam_pass(model, small, batch_size)
        t0 = time.perf_counter()
        cams.run(params, ckpt, dataset, tmp / "cams.h5")
        t_cams = time.perf_counter() - t0
        # The same stage with the network as loaded (no BatchNorm folding, no channels_last).
        real, cams.inference_model = cams.inference_model, lambda m: (m, False)
        try:
            t0 = time.perf_counter()
            cams.run(params, ckpt, dataset, tmp / "plain.h5")
            t_plain = time.perf_counter() - t0
        finally:
            cams.inference_model = real
        t0 = time.perf_counter()
        maps = gradcam_pass(model, dataset, batch_size)
        t_grad = time.perf_counter() - t0
        t_grad_cl = None
        if gradcam_channels_last:
            model = model.to(memory_format=torch.channels_last)
            gradcam_pass(model, small, batch_size, channels_last=True)
            t0 = time.perf_counter()
            gradcam_pass(model, dataset, batch_size, channels_last=True)
            t_grad_cl = time.perf_counter() - t0
        with h5py.File(tmp / "cams.h5") as f:
            ours = f["cam"].shape
    return {
        "slices": n,
        "input": size,
        "test_scale": read_at,
        "map": list(ours[-2:]),
        "gradcam_map": list(maps.shape[-2:]),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "cams_img_per_s": n / t_cams,
        "cams_plain_network_img_per_s": n / t_plain,
        "gradcam_img_per_s": n / t_grad,
        "gradcam_channels_last_img_per_s": n / t_grad_cl if t_grad_cl else None,
        "ratio": t_grad / t_cams,
        "target_ratio": 3.0,
        "met": t_grad / t_cams >= 3.0,
        "load": load(),
    }


def _child_make(folder: Path, n: int, size: int) -> None:
    make_dataset(folder / "dataset.h5", n, size)
    make_checkpoint(folder / "classifier.pt", size, **LIGHT)


def _child_run(folder: Path) -> dict:
    params = parse_params({"common": {"device": "cpu"}})
    return peak_memory(cams.run, params, folder / "classifier.pt", folder / "dataset.h5", folder / "cams.h5")


def memory(sizes: list[int], size: int = 128) -> dict:
    """Peak memory of the cams stage (fresh process each) at each number of slices."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            run_child(__file__, "--make", tmp, str(n), str(size))
            rows.append({"slices": n, **run_child(__file__, "--child", tmp), "load": load()})
    growth = rows[-1]["hwm_mib"] / rows[0]["hwm_mib"] - 1
    return {"rows": rows, "growth": growth, "target": 0.10, "met": abs(growth) <= 0.10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=512, help="slices for the speed comparison (0: skip)")
    ap.add_argument("--size", type=int, default=128, help="input side (128, 256, 512)")
    ap.add_argument("--test-scale", type=float, default=None,
                    help="train_classifier.test_scale of the network (default: the params default, 2; "
                         "params.ct.yaml reads 256^2 and 512^2 inputs at 1)")
    ap.add_argument("--memory-slices", type=int, nargs="*", default=[1000, 20000])
    ap.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        _child_make(Path(args.make[0]), int(args.make[1]), int(args.make[2]))
        print("{}")
        return
    if args.child:
        print(json.dumps(_child_run(Path(args.child))))
        return
    if args.slices:
        s = speed(args.slices, args.size, test_scale=args.test_scale)
        print(f"\ncams vs GradCAM, {s['slices']} slices at {s['input']}^2, {s['threads']} threads, "
              f"load {s['load']}")
        print(f"cams stage {s['cams_img_per_s']:.1f} img/s, GradCAM {s['gradcam_img_per_s']:.1f} img/s: "
              f"{s['ratio']:.2f}x (target 3x: {'met' if s['met'] else 'NOT met'})")
    if len(args.memory_slices) >= 2:
        m = memory(args.memory_slices, args.size)
        print("\ncams stage peak memory (VmHWM, MiB)")
        for r in m["rows"]:
            print(f"{r['slices']:>8} slices {r['hwm_mib']:>8.1f} MiB {r['seconds']:>7.1f} s  "
                  f"load {r['load']}")
            print(f"{'':>8} RSS median by tenth of the run (MiB): "
                  + " ".join(f"{m:.0f}" for m in r["tree_tenths_mib"]))
        print(f"growth {m['growth']:+.1%} (target within 10%: {'met' if m['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
