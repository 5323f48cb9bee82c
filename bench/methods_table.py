"""The results table of docs/METHODS.md: the baseline and each method option, from `dvc exp show --json`.

    python bench/methods_table.py                        # in the repo where the sweep ran (docs/METHODS.md)
    python bench/methods_table.py --log sweep.log        # plus stage times from a timestamped run log

One row per experiment: the options of train_classifier it sets, then the heatmap's test AUROC and
``point_acc``, ``dice_pos`` of the heatmap, the pseudo-masks and the segmenter, and the segmenter's
``fp_slice_rate`` (all from metrics/evaluate.json, annotated test slices, class ``any``).

``--log``: a log of ``dvc repro`` / ``dvc exp run --run-all`` whose every line starts with the epoch time
(``... 2>&1 | while IFS= read -r l; do echo "$(date +%s) $l"; done``); the wall time of each stage run
in it is printed in order (each stage lasts until the next stage or experiment starts).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

OPTIONS = ("decoder", "pooling", "deep_supervision", "slice_context", "context_slices", "minmax_entropy_weight")
METRICS = (("heatmap", "auroc"), ("heatmap", "point_acc"), ("heatmap", "dice_pos"), ("pseudo_mask", "dice_pos"),
           ("segmenter", "dice_pos"), ("segmenter", "fp_slice_rate"))


def _runs(node, out: list) -> list:
    """Every (name, data) with params and metrics in the nested `dvc exp show --json` answer."""
    if isinstance(node, list):
        for item in node:
            _runs(item, out)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and node.get("rev") != "workspace":
            out.append((node.get("name") or str(node.get("rev"))[:7], data))
        for key in ("experiments", "revs"):
            if node.get(key):
                _runs(node[key], out)
    return out


def _method(p: dict) -> str:
    parts = [p.get("decoder", "unet")]
    parts.append(f"{p.get('pooling')} pooling" + ("" if p.get("deep_supervision") else ", no deep sup."))
    if p.get("slice_context", "none") != "none":
        parts.append(f"{p['slice_context']} over {p.get('context_slices')} slices")
    if p.get("minmax_entropy_weight", 0):
        parts.append(f"min-max entropy {p['minmax_entropy_weight']:g}")
    return ", ".join(parts)


def table(shown) -> str:
    head = ["experiment", "train_classifier options", "AUROC", "point_acc", "heatmap dice_pos",
            "pseudo_mask dice_pos", "segmenter dice_pos", "segmenter fp_slice_rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for name, data in _runs(shown, []):
        params = data["params"].get("params.yaml", {}).get("data", {}).get("train_classifier", {})
        ev = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data")
        if not ev:
            continue
        values = [ev.get(row, {}).get(key) for row, key in METRICS]
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "" for v in values]
        lines.append("| " + " | ".join([name, _method({k: params.get(k) for k in OPTIONS}), *cells]) + " |")
    return "\n".join(lines) + "\n"


def stage_times(log: Path) -> str:
    """Wall time of every stage run in a timestamped log, in order."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d+) (.*)", line)
        if not m:
            continue
        t, text = int(m.group(1)), m.group(2)
        stage = re.search(r"Running stage '([^']+)'", text)
        if stage or re.search(r"Reproducing experiment|Ran experiment", text):
            events.append((t, stage.group(1) if stage else None, text.strip()))
        last = t
    rows = []
    for (t, stage, text), nxt in zip(events, events[1:] + [(last, None, "")]):
        if stage:
            rows.append(f"{stage}\t{nxt[0] - t} s")
        else:
            rows.append(text)
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="the repository the sweep ran in")
    ap.add_argument("--log", type=Path, help="timestamped log of the runs (stage wall times)")
    args = ap.parse_args()
    res = subprocess.run(["dvc", "exp", "show", "--json"], cwd=args.repo, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    print(table(json.loads(res.stdout[res.stdout.index("["):])), end="")
    if args.log:
        print()
        print(stage_times(args.log), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
