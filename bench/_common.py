"""Shared by the benchmarks: synthetic inputs written in chunks, peak-memory probes, the machine header.

Inputs are made here, not by ``prepare``: 128x128 (or any side) HU slices of a brain-like disc with a
bright blob on the positive slices, the matching masks, and logit maps with a Gaussian bump near the
blob. Content does not matter for throughput or memory; sizes, dtypes and chunking follow the
dataset.h5 / cams.h5 contracts. Everything is written ``chunk`` slices at a time, so making 20,000
slices needs no more memory than making 1,000.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from weak2full.h5 import SCHEMA_VERSION

__all__ = ["make_dataset", "machine", "load", "tree_rss_mib", "peak_memory", "run_child"]


def _slices(rng: np.random.Generator, n: int, size: int, positive: np.ndarray):
    """HU slices int16 (n, size, size), masks uint8, and (cy, cx, r) of each blob."""
    yy, xx = np.mgrid[:size, :size]
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    image = np.full((n, size, size), -1000, np.int16)
    mask = np.zeros((n, size, size), np.uint8)
    blobs = []
    for i in range(n):
        image[i][head] = (37 + rng.normal(0, 3, int(head.sum()))).round()
        lo, hi = int(0.25 * size), int(0.75 * size)
        cy, cx = rng.integers(lo, hi, 2).tolist()
        r = int(rng.integers(max(2, size // 40), max(3, size // 14)))
        blobs.append((cy, cx, r))
        if positive[i]:
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[i][disc] += 18
            mask[i][disc] = 1
    return image, mask, blobs


def make_dataset(
    path: Path, n: int, size: int = 128, positive_fraction: float = 1.0, seed: int = 0, chunk: int = 500,
    annotated: bool = False, with_cams: Path | None = None, cam_size: int | None = None,
) -> Path:
    """A dataset.h5 of ``n`` slices (32 a patient, all train; ``annotated``: masks readable) and, with
    ``with_cams``, a cams.h5 of logit bumps beside each slice's blob (also on negative slices), maps
    ``cam_size`` a side (default: the image side)."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < positive_fraction
    cam_size = cam_size or size
    scale = cam_size / size
    yy, xx = np.mgrid[:cam_size, :cam_size]
    with h5py.File(path, "w", track_order=True) as f:
        img = f.create_dataset("image", (n, size, size), np.int16, chunks=(1, size, size), track_times=False)
        msk = f.create_dataset("mask", (n, size, size), np.uint8, chunks=(1, size, size), track_times=False)
        f.create_dataset("patient", data=(np.arange(n) // 32).astype(np.int32), track_times=False)
        f.create_dataset("slice", data=(np.arange(n) % 32).astype(np.int32), track_times=False)
        f.create_dataset("label", data=positive[:, None].astype(np.uint8), track_times=False)
        f.create_dataset("has_mask", data=np.full(n, annotated), track_times=False)
        f.create_dataset("split", data=np.zeros(n, np.uint8), track_times=False)
        f.attrs.update(kind="dataset", schema_version=SCHEMA_VERSION, classes=json.dumps(["any"]),
                       mask_classes=json.dumps(["any"]), masks_complete=True, source="bench",
                       provenance="{}", pixel_spacing="null", params="{}")
        cf = h5py.File(with_cams, "w", track_order=True) if with_cams else None
        if cf is not None:
            cam = cf.create_dataset("cam", (n, 1, cam_size, cam_size), np.float16,
                                    chunks=(1, 1, cam_size, cam_size))
            cf.create_dataset("prob", data=positive[:, None].astype(np.float32))
            cf.attrs.update(kind="cams", schema_version=SCHEMA_VERSION, classes=json.dumps(["any"]),
                            method="heatmap", heatmap_size=cam_size, stride=round(1 / scale),
                            normalisation="sigmoid")
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            image, mask, blobs = _slices(rng, stop - start, size, positive[start:stop])
            img[start:stop], msk[start:stop] = image, mask
            if cf is not None:
                block = np.empty((stop - start, 1, cam_size, cam_size), np.float32)
                for j, blob in enumerate(blobs):
                    cy, cx, r = (v * scale for v in blob)
                    oy, ox = rng.normal(0, 2 * scale, 2)
                    d2 = (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2
                    block[j, 0] = -6 + 10 * np.exp(-d2 / (2 * (r + 2) ** 2))
                cam[start:stop] = block
        if cf is not None:
            cf.close()
    return path


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    """The header every result carries: CPU, cores, memory, versions, load, time."""
    import h5py as _h5py
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "h5py": _h5py.__version__}
    for name in ("timm", "segmentation_models_pytorch", "pydensecrf", "pytorch_grad_cam"):
        try:
            mod = __import__(name)
            versions[name] = getattr(mod, "__version__", "?")
        except ImportError:
            versions[name] = None
    try:
        from importlib.metadata import version

        versions["grad-cam"] = version("grad-cam")
        versions["pydensecrf2"] = version("pydensecrf2")
    except Exception:  # noqa: BLE001 - metadata is best effort
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": mem,
        "gpu": _gpu(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions,
        "load_average_start": load(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def tree_rss_mib(root: int) -> float:
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


def peak_memory(fn, *args) -> dict:
    """Run ``fn(*args)`` in this process and return its peaks in MiB: ``hwm`` (this process's VmHWM,
    reset by exec, so a fresh child reports its own peak) and ``tree`` (summed RSS of this process and
    its descendants, e.g. pool workers, sampled every 50 ms; shared pages count once per process), and
    ``tree_tenths_mib``: the median of those samples in each tenth of the run, which tells a transient
    peak (one high tenth) from growth (tenths that keep rising)."""
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append(tree_rss_mib(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    tenths = [np.median(part) for part in np.array_split(samples, 10) if len(part)]
    return {"hwm_mib": int(hwm[0].split()[1]) / 1024, "tree_mib": max(samples, default=0.0),
            "tree_tenths_mib": [round(float(m), 1) for m in tenths], "seconds": seconds}


def run_child(script: str, *args: str) -> dict:
    """Run ``python script args`` in a fresh process; its last stdout line is JSON, returned parsed."""
    res = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
