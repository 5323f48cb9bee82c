"""Benchmark of the pseudo_masks stage: pool throughput against a plain pydensecrf loop, and memory.

    python bench/bench_crf.py                       # 1,000 slices for speed; 1,000 and 20,000 for memory
    python bench/bench_crf.py --speed-slices 200 --memory-slices 200 2000 --workers 2

Synthetic inputs (bench/_common.py): 128x128 HU slices and logit maps with a Gaussian bump near a
bright blob; thresholds fixed and no annotated slice, so the stage does no calibration and no scoring.

* speed: every slice positive, so every slice runs the CRF. images/s of ``weak2full.pseudo_masks.run``
  (whole stage: HDF5 in and out, pool start included) with 1 (inline) and P workers against a
  single-process loop calling ``make_pseudo_mask`` on arrays in memory. Parallel efficiency =
  rate(P) / (P x rate(loop)); target >= 0.8. Also CPU ms per slice summed over all processes (workers
  counted once reaped): equal CPU per slice means the pool adds no work, so on P idle cores its rate is
  the loop's times P, whatever a busy machine lets the wall clock show.
* memory: 11% of slices positive (real CT-ICH), as in a real run. Inputs are made and the stage is run
  each in a fresh process per size (Linux carries ``ru_maxrss`` across fork+exec, so a child of a
  process that once held 20,000 slices would report that parent's peak). Reported: the stage
  process's VmHWM, and the peak of the whole process tree's summed RSS (stage and pool workers,
  sampled every 50 ms; shared pages count once per process). Target: peak at the largest size within
  10% of the smallest.

Timings on a machine shared with other jobs are contention-bound: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, make_dataset, peak_memory, run_child  # noqa: E402

from weak2full.cams import normalise_cam  # noqa: E402
from weak2full.params import parse_params  # noqa: E402
from weak2full.pseudo_masks import make_pseudo_mask, run  # noqa: E402

MEMORY_POSITIVE = 0.11


def bench_params(workers: int, chunk_size: int):
    return parse_params(
        {"pseudo_masks": {"thresholds": "fixed", "workers": workers, "chunk_size": chunk_size}}
    )


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (pool workers, once the pool shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of fn(*args)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn(*args)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def run_stage(folder: Path, workers: int, chunk_size: int) -> None:
    """The whole stage on folder/dataset.h5 + folder/cams.h5, thresholds fixed."""
    run(bench_params(workers, chunk_size), folder / "dataset.h5", folder / "cams.h5",
        folder / f"out-{workers}.h5", folder / "m.json", folder / "c.json")


def plain_loop(images: np.ndarray, cam: np.ndarray) -> None:
    """A single-process loop over pydensecrf (via make_pseudo_mask) on in-memory arrays."""
    pm = bench_params(1, 256).pseudo_masks
    label = np.ones(1, np.uint8)
    for i in range(len(images)):
        make_pseudo_mask(normalise_cam(cam[i], "sigmoid"), label, images[i], pm.fg, pm.bg, pm.crf)


def speed(n: int, workers: int, chunk_size: int = 256, size: int = 128, cam_size: int = 128) -> dict:
    """images/s and CPU ms/slice of the plain loop, the stage inline and the stage's pool.

    Maps are ``cam_size`` a side, slices ``size``: the CRF runs at the slice's resolution."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_dataset(folder / "dataset.h5", n, size, positive_fraction=1.0, with_cams=folder / "cams.h5",
                     cam_size=cam_size)
        with h5py.File(folder / "dataset.h5", "r") as d, h5py.File(folder / "cams.h5", "r") as c:
            images, cam = d["image"][:], c["cam"][:]
        rows = {
            "loop": timed(plain_loop, images, cam),
            "stage_inline": timed(run_stage, folder, 1, chunk_size),
            "stage_pool": timed(run_stage, folder, workers, chunk_size),
        }
        same = (folder / "out-1.h5").read_bytes() == (folder / f"out-{workers}.h5").read_bytes()
    rate = {k: n / wall for k, (wall, _) in rows.items()}
    efficiency = rate["stage_pool"] / (workers * rate["loop"])
    return {
        "slices": n,
        "input": size,
        "map": cam_size,
        "workers": workers,
        "img_per_s": rate,
        "cpu_ms_per_slice": {k: 1000 * cpu / n for k, (_, cpu) in rows.items()},
        "efficiency": efficiency,
        "target": 0.8,
        "met": efficiency >= 0.8,
        "bytes_identical_1_vs_P": same,
        "load": load(),
    }


def _child_run(folder: Path, workers: int, chunk_size: int) -> dict:
    return peak_memory(run_stage, folder, workers, chunk_size)


def memory(sizes: list[int], workers: int, chunk_size: int = 256) -> dict:
    """Peak memory of the stage (fresh process each) at each number of slices."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            run_child(__file__, "--make", tmp, str(n))
            res = run_child(__file__, "--child", tmp, "--workers", str(workers),
                            "--chunk-size", str(chunk_size))
            rows.append({"slices": n, **res, "load": load()})
    growth = {k: rows[-1][k] / rows[0][k] - 1 for k in ("hwm_mib", "tree_mib")}
    return {"rows": rows, "workers": workers, "positive_fraction": MEMORY_POSITIVE, "growth": growth,
            "target": 0.10, "met": all(abs(g) <= 0.10 for g in growth.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--speed-slices", type=int, default=1000, help="0 skips the speed part")
    ap.add_argument("--memory-slices", type=int, nargs="*", default=[1000, 20000])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        folder = Path(args.make[0])
        make_dataset(folder / "dataset.h5", int(args.make[1]), positive_fraction=MEMORY_POSITIVE,
                     with_cams=folder / "cams.h5")
        print("{}")
        return
    if args.child:
        print(json.dumps(_child_run(Path(args.child), args.workers, args.chunk_size)))
        return

    if args.speed_slices:
        s = speed(args.speed_slices, args.workers, args.chunk_size)
        print(f"\nspeed, {s['slices']} slices of 128x128, {os.cpu_count()} CPUs, load average {s['load']}")
        print(f"{'what':<22}{'images/s':>10}{'x loop':>8}{'CPU ms/slice':>14}")
        for k, r in s["img_per_s"].items():
            print(f"{k:<22}{r:>10.1f}{r / s['img_per_s']['loop']:>8.2f}{s['cpu_ms_per_slice'][k]:>14.2f}")
        same = "identical" if s["bytes_identical_1_vs_P"] else "DIFFERENT"
        met = "met" if s["met"] else "NOT met"
        print(f"parallel efficiency {s['efficiency']:.2f} (target >= 0.8: {met}); "
              f"output bytes workers=1 vs {args.workers}: {same}")
    if len(args.memory_slices) >= 2:
        m = memory(args.memory_slices, args.workers, args.chunk_size)
        print(f"\npeak memory (MiB), workers={args.workers}, chunk_size={args.chunk_size}")
        print(f"{'slices':>8}{'VmHWM':>10}{'all procs':>11}{'seconds':>10}")
        for r in m["rows"]:
            print(f"{r['slices']:>8}{r['hwm_mib']:>10.1f}{r['tree_mib']:>11.1f}{r['seconds']:>10.1f}")
        print(f"growth: stage {m['growth']['hwm_mib']:+.1%}, all processes {m['growth']['tree_mib']:+.1%} "
              f"(target within 10%: {'met' if m['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
