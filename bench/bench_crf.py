"""Benchmark of the pseudo_masks stage: pool throughput and memory against plain pydensecrf loops.

    python bench/bench_crf.py                       # 1,000 slices for speed, 1,000 and 10,000 for memory
    python bench/bench_crf.py --speed-slices 200 --memory-slices 200 2000 --workers 2

Synthetic inputs made here: 128x128 HU slices (brain with a bright blob) and 128x128 logit maps with a
Gaussian bump near it, every slice labelled positive so that every slice runs the CRF; thresholds fixed
and no annotated slice, so the stage does no calibration and no scoring, only the pooled pass.

* speed: images/s of ``weak2full.pseudo_masks.run`` with P workers (whole stage: HDF5 in and out, pool
  start included) against a single-process loop calling ``make_pseudo_mask`` on arrays in memory.
  Target: rate(P) >= 0.8 * P * rate(loop). Also CPU ms per slice summed over all processes (workers
  counted once reaped): equal CPU per slice means the pool adds no work, so on P idle cores its rate is
  the loop's times P, whatever a busy machine lets the wall clock show.
* memory: inputs are made and the stage is run each in a fresh subprocess per size (Linux carries
  ``ru_maxrss`` across fork+exec, so a child of a process that once held 10,000 slices would report that
  parent's peak). Reported: the stage process's ``resource.getrusage`` maxrss (and its VmHWM from /proc,
  the same peak without that inheritance), and the peak of the whole
  process tree's summed RSS (stage, fork server, workers; sampled from /proc every 50 ms, since pool
  workers are the fork server's children and never reach RUSAGE_CHILDREN; shared pages count once per
  process). Target: peak at 10,000 slices within 10% of 1,000.

Timings on a machine shared with other jobs are contention-bound: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from weak2full.cams import normalise_cam
from weak2full.h5 import SCHEMA_VERSION, write_dataset
from weak2full.params import parse_params
from weak2full.pseudo_masks import make_pseudo_mask, run

SIZE = 128


def make_inputs(folder: Path, n: int, seed: int = 0, chunk: int = 500) -> tuple[Path, Path]:
    """dataset.h5 and cams.h5 with n positive, unannotated train slices (written in chunks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.empty((n, SIZE, SIZE), np.int16)
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    cams = folder / "cams.h5"
    with h5py.File(cams, "w") as f:
        cam = f.create_dataset("cam", (n, 1, SIZE, SIZE), np.float16, chunks=(1, 1, SIZE, SIZE))
        f.create_dataset("prob", data=np.ones((n, 1), np.float32))
        f.attrs.update(kind="cams", schema_version=SCHEMA_VERSION, classes=json.dumps(["any"]))
        f.attrs.update(method="heatmap", heatmap_size=SIZE, stride=1, normalisation="sigmoid")
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = np.empty((stop - start, 1, SIZE, SIZE), np.float32)
            for j, i in enumerate(range(start, stop)):
                cy, cx, r = rng.integers(30, 98, 2).tolist() + [int(rng.integers(3, 9))]
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                image[i] = (37 + rng.normal(0, 3, (SIZE, SIZE))).round()
                image[i][d2 <= r * r] += 18
                mask[i][d2 <= r * r] = 1
                oy, ox = rng.normal(0, 2, 2)
                d2 = (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2
                block[j, 0] = -6 + 10 * np.exp(-d2 / (2 * (r + 2) ** 2))
            cam[start:stop] = block
    write_dataset(
        folder / "dataset.h5",
        image=image,
        patient=np.arange(n, dtype=np.int32) // 32,
        slice_index=np.arange(n, dtype=np.int32) % 32,
        label=np.ones((n, 1), np.uint8),
        mask=mask,
        has_mask=np.zeros(n, bool),
        split=np.zeros(n, np.uint8),
        classes=["any"],
        mask_classes=["any"],
        masks_complete=True,
        source="bench",
    )
    return folder / "dataset.h5", cams


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


def run_stage(folder: Path, dataset: Path, cams: Path, workers: int, chunk_size: int) -> None:
    """The whole stage, thresholds fixed."""
    run(
        bench_params(workers, chunk_size),
        dataset,
        cams,
        folder / f"out-{workers}.h5",
        folder / "m.json",
        folder / "c.json",
    )


def plain_loop(images: np.ndarray, cam: np.ndarray) -> None:
    """A single-process loop over pydensecrf (via make_pseudo_mask) on in-memory arrays."""
    pm = bench_params(1, 256).pseudo_masks
    label = np.ones(1, np.uint8)
    for i in range(len(images)):
        make_pseudo_mask(normalise_cam(cam[i], "sigmoid"), label, images[i], pm.fg, pm.bg, pm.crf)


def _tree_rss_mib(root: int) -> float:
    """Summed VmRSS of ``root`` and all its descendants, from /proc (Linux)."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parent[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total = 0
    for pid in rss:
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        total += rss[pid] if p == root else 0
    return total / 1024


def speed(folder: Path, args) -> None:
    """Print images/s of the plain loop, the stage inline and the stage's pool on the same inputs."""
    folder.mkdir()
    n = args.speed_slices
    dataset, cams = make_inputs(folder, n)
    with h5py.File(dataset, "r") as d, h5py.File(cams, "r") as c:
        images, cam = d["image"][:], c["cam"][:]
    chunk = args.chunk_size
    rows = [
        ("single-process pydensecrf loop", timed(plain_loop, images, cam)),
        ("stage, workers=1 (inline)", timed(run_stage, folder, dataset, cams, 1, chunk)),
        (
            f"stage, workers={args.workers} (pool)",
            timed(run_stage, folder, dataset, cams, args.workers, chunk),
        ),
    ]
    same = (folder / "out-1.h5").read_bytes() == (folder / f"out-{args.workers}.h5").read_bytes()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nspeed, {n} slices of {SIZE}x{SIZE}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{'what':<34}{'images/s':>10}{'x loop':>8}{'CPU ms/slice':>14}")
    loop = n / rows[0][1][0]
    for what, (wall, cpu) in rows:
        print(f"{what:<34}{n / wall:>10.1f}{n / wall / loop:>8.2f}{1000 * cpu / n:>14.2f}")
    pool = n / rows[-1][1][0]
    target = 0.8 * args.workers
    print(f"target x loop >= {target:.2f}: {'met' if pool / loop >= target else 'NOT met'}")
    print(f"output bytes workers=1 vs {args.workers}: {'identical' if same else 'DIFFERENT'}", flush=True)


def child(args) -> None:
    """Run the stage once in this (fresh) process and print its peak memory as JSON."""
    folder = Path(args.child)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss_mib(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_stage(folder, folder / "dataset.h5", folder / "cams.h5", args.workers, args.chunk_size)
    done.set()
    sampler.join()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    hwm_mib = int(hwm[0].split()[1]) / 1024  # this process image's own peak (reset by exec)
    print(json.dumps({"stage_mib": own, "hwm_mib": hwm_mib, "tree_mib": peak[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--speed-slices", type=int, default=1000, help="0 skips the speed part")
    ap.add_argument("--memory-slices", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--make", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_inputs(Path(args.child), args.make)
        return
    if args.child:
        return child(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.speed_slices:
            speed(Path(tmp) / "speed", args)

        for n in args.memory_slices:
            folder = Path(tmp) / f"mem{n}"
            folder.mkdir()
            subprocess.run([sys.executable, __file__, "--child", str(folder), "--make", str(n)], check=True)
            cmd = [sys.executable, __file__, "--child", str(folder), "--workers", str(args.workers)]
            cmd += ["--chunk-size", str(args.chunk_size)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append((n, json.loads(res.stdout.strip().splitlines()[-1]), time.perf_counter() - t0))
            for f in folder.iterdir():
                f.unlink()
    print(f"\npeak memory (maxrss, MiB), workers={args.workers}, chunk_size={args.chunk_size}")
    print(f"{'slices':>8}{'stage':>10}{'VmHWM':>10}{'all procs':>11}{'seconds':>10}")
    for n, mem, secs in rows:
        print(f"{n:>8}{mem['stage_mib']:>10.1f}{mem['hwm_mib']:>10.1f}{mem['tree_mib']:>11.1f}{secs:>10.1f}")
    if len(rows) >= 2:
        (n0, m0, _), (n1, m1, _) = rows[0], rows[-1]
        for key, what in (("hwm_mib", "stage process (VmHWM)"), ("tree_mib", "all processes")):
            print(f"{what} peak at {n1} vs {n0}: {m1[key] / m0[key] - 1:+.1%} (target within 10%)")


if __name__ == "__main__":
    main()
