"""The results table of docs/METHODS.md: the baseline and each method option, from `dvc exp show --json`.

    python bench/methods_table.py                        # in the repo where the sweep ran (docs/METHODS.md)
    python bench/methods_table.py --log sweep.log        # plus stage times from a timestamped run log

One row per experiment: the options of train_classifier it sets, then the heatmap's test AUROC and
``point_acc``, ``dice_pos`` of the heatmap, the pseudo-masks and the segmenter, and the segmenter's
``fp_slice_rate`` (all from metrics/evaluate.json, annotated test slices, class ``any``).

``--log``: a log of ``dvc repro`` / ``dvc exp run --run-all`` whose every line starts with the epoch time
(``... 2>&1 | while IFS= read -r l; do echo "$(date +%s) $l"; done``): adds each experiment's
train_classifier wall time to the table and prints every stage's below it. Wall times on a shared
machine depend on its load: report them with ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

OPTIONS = ("decoder", "pooling", "deep_supervision", "slice_context", "context_slices",
           "minmax_entropy_weight")
METRICS = (("heatmap", "auroc"), ("heatmap", "point_acc"), ("heatmap", "dice_pos"),
           ("pseudo_mask", "dice_pos"), ("segmenter", "dice_pos"), ("segmenter", "fp_slice_rate"))


def _runs(shown: list) -> list:
    """(name, data) of every finished experiment in the `dvc exp show --json` answer, oldest first.

    Commits are left out: their committed metrics may come from another machine or another code state.
    """
    out = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            state = ((exp.get("executor") or {}).get("state")) or "success"
            if state != "success":
                continue  # queued, running or failed: no metrics of its own yet
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                out.append((exp.get("name") or rev.get("name") or str(rev.get("rev"))[:7],
                            data.get("timestamp") or "", data))
    return [(name, data) for name, _, data in sorted(out, key=lambda r: r[1])]


def _method(p: dict) -> str:
    parts = [p.get("decoder", "unet")]
    sup = "deep sup." if p.get("deep_supervision") else "no deep sup."
    parts.append(f"{p.get('pooling')} pooling, {sup}")
    if p.get("slice_context", "none") != "none":
        parts.append(f"{p['slice_context']} over {p.get('context_slices')} slices")
    if p.get("minmax_entropy_weight", 0):
        parts.append(f"min-max entropy {p['minmax_entropy_weight']:g}")
    return ", ".join(parts)


def table(shown, times: dict | None = None) -> str:
    head = ["experiment", "train_classifier options", "AUROC", "point_acc", "heatmap dice_pos",
            "pseudo_mask dice_pos", "segmenter dice_pos", "segmenter fp_slice_rate"]
    if times is not None:
        head.append("train_classifier wall time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for name, data in _runs(shown):
        params = data["params"].get("params.yaml", {}).get("data", {}).get("train_classifier", {})
        ev = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data")
        if not ev:
            continue
        values = [ev.get(row, {}).get(key) for row, key in METRICS]
        cells = [f"{v:.3f}" if isinstance(v, (int, float)) else "" for v in values]
        if times is not None:
            sec = times.get(name, {}).get("train_classifier")
            cells.append(f"{sec // 60} min {sec % 60:02d} s" if sec is not None else "")
        lines.append("| " + " | ".join([name, _method({k: params.get(k) for k in OPTIONS}), *cells]) + " |")
    return "\n".join(lines) + "\n"


def stage_times(log: Path) -> dict:
    """{experiment: {stage: wall seconds}} from a timestamped log (``None`` keys a plain `dvc repro`).

    A stage lasts until the next stage or experiment starts, or the log's last line; a stage restored
    from the cache shows as a few seconds.
    """
    events, last = [], None
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d+) (.*)", line)
        if not m:
            continue
        last = int(m.group(1))
        stage = re.search(r"Running stage '([^']+)'", m.group(2))
        exp = re.search(r"Reproducing experiment '([^']+)'", m.group(2))
        if stage or exp:
            events.append((last, stage.group(1) if stage else None, exp.group(1) if exp else None))
    times: dict = {}
    current = None
    for (t, stage, exp), nxt in zip(events, events[1:] + [(last, None, None)]):
        if exp:
            current = exp
        else:
            times.setdefault(current, {})[stage] = nxt[0] - t
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="the repository the sweep ran in")
    ap.add_argument("--log", type=Path, help="timestamped log of the runs (stage wall times)")
    args = ap.parse_args()
    res = subprocess.run(["dvc", "exp", "show", "--json"], cwd=args.repo, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    times = stage_times(args.log) if args.log else None
    print(table(json.loads(res.stdout[res.stdout.index("["):]), times), end="")
    if times:
        print()
        for exp, stages in times.items():
            print(f"{exp}: " + ", ".join(f"{stage} {sec} s" for stage, sec in stages.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
