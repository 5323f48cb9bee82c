"""Every performance figure of issue 7 in one run: one table, and bench/results/latest.json.

    PYTHONPATH=src python bench/run_all.py            # full (about 10 min on an idle 2-core CPU)
    PYTHONPATH=src python bench/run_all.py --quick    # the same figures on smaller sizes (about 3 min)

Each figure is measured side by side with its reference, in this run, on this machine:

* ``cams_vs_gradcam``: the cams stage (default heatmap network, 128^2) against pytorch-grad-cam's
  GradCAM on the same network, inputs and batches; target >= 3x.
* ``crf_parallel_efficiency``: the pseudo_masks stage with P workers (P = CPUs) against a
  single-process pydensecrf loop; target >= 0.8 P.
* ``memory_growth``: peak memory of cams and pseudo_masks at 20,000 slices against 1,000; target
  within 10%.
* ``train_img_per_s``: fit() of the default classifier and segmenter at 128^2 and 256^2 with
  DataLoader workers 0, 1, 2 (the best is the tuned figure).
* ``input_512_stride4``: classifier training, cams (vs GradCAM) and pseudo_masks at 512^2 with the
  stride-4 128^2 map, beside the 128^2 figures: the setting runs on a CPU.
* ``scale_inputs``: counted forward FLOPs and data-path CPU ms per sample, for bench/scale.py.

Details of each measurement: the docstrings of bench_cams.py, bench_crf.py, bench_train.py. The header
holds the machine, the versions and the load average at start and end (others share this CPU). GPU
figures (bf16 AMP, channels_last, 512^2 on a GPU) need a GPU: without one they are reported as not
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cams  # noqa: E402
import bench_crf  # noqa: E402
import bench_train  # noqa: E402
from _common import load, machine, make_dataset  # noqa: E402

from weak2full.h5 import atomic_output  # noqa: E402
from weak2full.params import load_params  # noqa: E402

# The real-data preset: the 512^2 rows read the network as it does. The default test_scale (2) would
# make the cams row read 1024^2 slices, and GradCAM's activations for a batch of 32 at that size do not
# fit in 24 GiB (the run was killed for memory on this machine).
CT_PRESET = Path(__file__).resolve().parents[1] / "params.ct.yaml"

FULL = dict(cams_slices=256, crf_slices=1000, memory_slices=[1000, 20000], train_steps=4, train_warmup=2,
            train_slices=256,
            slices_512=32, train_steps_512=2)
QUICK = dict(cams_slices=64, crf_slices=200, memory_slices=[1000, 5000], train_steps=2, train_warmup=1,
             train_slices=64,
             slices_512=8, train_steps_512=1)


def measure(cfg: dict, workers: int, log) -> dict:
    res: dict = {}
    log("cams vs GradCAM (128^2)")
    res["cams_vs_gradcam"] = bench_cams.speed(cfg["cams_slices"], 128)
    log("CRF: pool vs plain loop")
    res["crf_parallel_efficiency"] = bench_crf.speed(cfg["crf_slices"], workers)
    log("memory: cams")
    mem = {"cams": bench_cams.memory(cfg["memory_slices"])}
    log("memory: pseudo_masks")
    mem["pseudo_masks"] = bench_crf.memory(cfg["memory_slices"], workers)
    res["memory_growth"] = mem
    log("training throughput")
    res["train_img_per_s"] = bench_train.sweep(steps=cfg["train_steps"], slices=cfg["train_slices"],
                                               warmup=cfg["train_warmup"])
    log("512^2 with the stride-4 128^2 map")
    best = res["train_img_per_s"]["best"]["classifier_128"]["num_workers"]
    with tempfile.TemporaryDirectory() as tmp:
        d512 = make_dataset(Path(tmp) / "d512.h5", max(32, cfg["slices_512"]), 512, 0.3)
        train512 = bench_train.throughput("classifier", d512, 512, best, cfg["train_steps_512"], warmup=1)
    res["input_512_stride4"] = {
        "train_classifier": train512,
        "cams": bench_cams.speed(cfg["slices_512"], 512, gradcam_channels_last=False,
                                 test_scale=load_params(CT_PRESET).train_classifier.test_scale),
        "pseudo_masks": bench_crf.speed(cfg["slices_512"], workers, size=512, cam_size=128),
    }
    log("inputs of the scale estimate: FLOPs per image, data loading CPU per sample")
    res["scale_inputs"] = scale_inputs()
    return res


def scale_inputs() -> dict:
    """Counted FLOPs of one forward pass, and measured CPU ms per sample of the data path, per input size.

    128^2: the networks as params.yaml builds them (read at 2x); 256^2 and 512^2: as the real-data
    preset does (read at 1x), which is what bench/scale.py extrapolates to RSNA size."""
    out = {"forward_gflop": {}, "loader_cpu_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (128, 256, 512):
            preset = None if size == 128 else CT_PRESET
            for net in ("classifier", "gap_cam", "segmenter"):
                out["forward_gflop"][f"{net}_{size}"] = bench_train.flops(net, size, preset) / 1e9
            d = make_dataset(Path(tmp) / f"s{size}.h5", 64, size, 0.3)
            out["loader_cpu_ms"][f"augmented_{size}"] = bench_train.loader_ms(d, augment=True)
            out["loader_cpu_ms"][f"plain_{size}"] = bench_train.loader_ms(d, augment=False)
    return out


def rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, measured, reference, result, target) for the table."""
    out = []
    c = res["cams_vs_gradcam"]
    ref = f"GradCAM {c['gradcam_img_per_s']:.1f} img/s"
    if c.get("gradcam_channels_last_img_per_s"):
        ref += f" (channels_last: {c['gradcam_channels_last_img_per_s']:.1f})"
    out.append((f"cams stage vs GradCAM, {c['slices']} slices at 128² read at {c.get('test_scale', 1):g}×, "
                f"batch {c['batch_size']}",
                f"{c['cams_img_per_s']:.1f} img/s (plain network: {c['cams_plain_network_img_per_s']:.1f})",
                ref, f"{c['ratio']:.2f}×",
                f"≥ 3×: {'met' if c['met'] else 'missed'}"))
    s = res["crf_parallel_efficiency"]
    out.append((f"pseudo_masks, {s['workers']} workers, {s['slices']} positive slices at 128²",
                f"{s['img_per_s']['stage_pool']:.1f} img/s "
                f"({s['cpu_ms_per_slice']['stage_pool']:.1f} CPU ms/slice)",
                f"loop {s['img_per_s']['loop']:.1f} img/s ({s['cpu_ms_per_slice']['loop']:.1f} CPU ms/slice)",
                f"efficiency {s['efficiency']:.2f}", f"≥ 0.8: {'met' if s['met'] else 'missed'}"))
    for stage, m in res["memory_growth"].items():
        first, last = m["rows"][0], m["rows"][-1]
        keys = ("hwm_mib",) if stage == "cams" else ("hwm_mib", "tree_mib")
        what = {"hwm_mib": "stage", "tree_mib": "stage + workers"}
        for k in keys:
            out.append((f"{stage} peak memory ({what[k]}), {last['slices']:,} slices",
                        f"{last[k]:.0f} MiB", f"{first[k]:.0f} MiB at {first['slices']:,}",
                        f"{last[k] / first[k] - 1:+.1%}",
                        f"within 10%: {'met' if abs(last[k] / first[k] - 1) <= 0.10 else 'missed'}"))
    t = res["train_img_per_s"]
    for key, b in t["best"].items():
        net, size = key.rsplit("_", 1)
        others = ", ".join(f"{r['num_workers']}: {r['img_per_s']:.1f}" for r in t["rows"]
                           if r["net"] == net and str(r["input"]) == size)
        out.append((f"train {net} {size}², batch 16",
                    f"{b['img_per_s']:.1f} img/s (workers {b['num_workers']})",
                    f"workers {others}", "best of 0/1/2", "tuned"))
    x = res["input_512_stride4"]
    tr, cm, pm = x["train_classifier"], x["cams"], x["pseudo_masks"]
    b128 = t["best"]["classifier_128"]["img_per_s"]
    out.append(("train classifier 512² (stride-4 128² map)", f"{tr['img_per_s']:.2f} img/s",
                f"128²: {b128:.1f} img/s", f"{tr['img_per_s'] / b128:.3f}×", "runs"))
    out.append((f"cams 512² read at {cm.get('test_scale', 1):g}×, {cm['slices']} slices "
                f"(map {cm['map'][0]}²)",
                f"{cm['cams_img_per_s']:.2f} img/s",
                f"GradCAM {cm['gradcam_img_per_s']:.2f} img/s", f"{cm['ratio']:.2f}×", "runs"))
    out.append((f"pseudo_masks 512², {pm['slices']} slices, {pm['workers']} workers",
                f"{pm['img_per_s']['stage_pool']:.2f} img/s",
                f"128²: {s['img_per_s']['stage_pool']:.1f} img/s",
                f"{pm['img_per_s']['stage_pool'] / s['img_per_s']['stage_pool']:.3f}×", "runs"))
    if not res.get("gpu"):
        out.append(("GPU: bf16 AMP, channels_last, 512² chain", "not measured", "no GPU on this machine",
                    "", ""))
    return out


def table(res: dict) -> str:
    head = ("figure", "measured", "reference", "result", "target")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(res)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (same figures, noisier)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "latest.json")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="pseudo_masks pool size P")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s, load {load()}] {what}", file=sys.stderr, flush=True)

    header = machine()
    res = measure(cfg, args.workers, log)
    header["load_average_end"] = load()
    header["seconds"] = round(time.perf_counter() - t0, 1)
    doc = {"machine": header, "command": "PYTHONPATH=src python bench/run_all.py" + (" --quick" * args.quick),
           "mode": "quick" if args.quick else "full", "sizes": cfg, **res}
    doc["table"] = table(res)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    m = header
    print(f"\nweak2full bench ({doc['mode']}), {m['date']}: {m['cpu']}, {m['usable_cpus']} CPUs, "
          f"{m['memory']}, GPU {m['gpu'] or 'none'}; torch {m['versions']['torch']} ({m['torch_threads']} "
          f"threads), grad-cam {m['versions'].get('grad-cam')}, "
          f"pydensecrf2 {m['versions'].get('pydensecrf2')}; "
          f"load average {m['load_average_start']} at start, {m['load_average_end']} at end; "
          f"{m['seconds']:.0f} s\n")
    print(doc["table"])
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
