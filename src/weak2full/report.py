"""What the evaluate stage shows: the results table, DVC plot files and one static HTML report.

* :func:`format_results_table` turns ``metrics/evaluate.json`` into the Markdown table printed by
  ``python -m weak2full results`` (and pasted into the README).
* :func:`write_plots` writes CSV files that ``dvc plots show`` reads (declared in dvc.yaml):
  ``dice_vs_threshold.csv`` (column ``threshold`` plus one ``dice_pos`` column per method),
  ``per_slice_dice.csv`` (column ``fraction`` plus each method's per-slice Dice sorted ascending: a
  quantile curve) and ``roc/<method>.csv`` (``fpr``, ``tpr``).
* :func:`write_html_report` writes one self-contained HTML file (images embedded as base64 PNG), readable
  from disk without a server: the table, then overlay rows for the best, median and worst test slices.

Every file is written through :func:`weak2full.h5.atomic_output`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

from weak2full.data import window as apply_window
from weak2full.errors import InvalidInputError
from weak2full.h5 import atomic_output

__all__ = [
    "METHODS",
    "COLUMNS",
    "format_cell",
    "format_results_table",
    "pick_examples",
    "write_plots",
    "write_html_report",
]

# Rows of the results table, in the order of the chain; the oracle is always shown as the ceiling.
METHODS = ("gap_cam", "heatmap", "pseudo_mask", "segmenter", "cascade", "oracle")
LABELS = {"oracle": "oracle (ceiling)", "cascade": "cascade (segmenter gated by heatmap)"}
COLUMNS = ("dice_pos", "dice_pos_ci95", "dice_patient", "iou_pos", "fp_slice_rate", "hd95", "point_acc",
           "auroc")
# Top-level entries of evaluate.json that are not methods.
NOT_METHODS = ("weak_over_full", "weak_over_full_ci95")

TRUTH_COLOUR = "#00e000"  # truth outline, on every panel
PRED_COLOUR = "#ff3030"  # predicted foreground
UNLABELED_COLOUR = "#ffd000"  # a pseudo-mask's ignored band (255)


# ------------------------------------------------------------------------------------------- table


def _interval(value) -> str:
    """A ``{"low", "high"}`` interval as ``0.470–0.680``; blank when absent."""
    if not isinstance(value, Mapping) or not all(isinstance(value.get(k), (int, float))
                                                 for k in ("low", "high")):
        return ""
    return f"{float(value['low']):.3f}–{float(value['high']):.3f}"


def format_cell(value, column: str) -> str:
    """One cell of a results table: three decimals (``hd95``: one), an interval column (``*_ci95``) as
    ``low–high``, blank for a missing or non-numeric value."""
    if column.endswith("_ci95"):
        return _interval(value)
    if value is None or isinstance(value, (dict, list, str)):
        return ""
    value = float(value)
    if not math.isfinite(value):
        return ""
    return f"{value:.1f}" if column == "hd95" else f"{value:.3f}"


def _methods(table: Mapping) -> list[str]:
    """The known methods present in ``table`` in chain order, then any other method entries."""
    present = [m for m in METHODS if isinstance(table.get(m), Mapping)]
    extra = [k for k, v in table.items() if isinstance(v, Mapping) and k not in METHODS + NOT_METHODS]
    return present + extra


def _rows(table: Mapping) -> list[tuple[str, list[str]]]:
    return [(LABELS.get(m, m), [format_cell(table[m].get(c), c) for c in COLUMNS]) for m in _methods(table)]


def _ratio_line(table: Mapping) -> str:
    ratio = table.get("weak_over_full")
    if ratio is None:
        return "weak_over_full: n/a (needs both a segmenter and an oracle dice_pos)"
    line = f"weak_over_full: {float(ratio):.3f} (segmenter dice_pos / oracle dice_pos)"
    interval = _interval(table.get("weak_over_full_ci95"))
    return line + (f"; 95% interval over test patients {interval}" if interval else "")


def format_results_table(table: Mapping) -> str:
    """The evaluate.json content as a Markdown table plus the ``weak_over_full`` line.

    Rows are the methods in chain order (``oracle`` labelled ``oracle (ceiling)``), columns
    :data:`COLUMNS`; a metric a method does not have is left blank. Dice-like scores get three
    decimals, ``hd95`` (pixels) one; ``dice_pos_ci95`` is the patient-bootstrap 95% interval.
    """
    if not isinstance(table, Mapping) or not _methods(table):
        raise InvalidInputError("the results hold no method entries (expected e.g. 'segmenter': {...}).")
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for label, cells in _rows(table):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _ratio_line(table) + "\n"


# ------------------------------------------------------------------------------------------- plots


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def write_plots(
    curves: Mapping[str, Sequence[Mapping]],
    per_slice_dice: Mapping[str, np.ndarray],
    roc: Mapping[str, tuple[np.ndarray, np.ndarray]],
    out_dir: str | Path,
) -> dict[str, Path]:
    """Write the evaluate stage's DVC plot files under ``out_dir``.

    Args:
        curves: method -> records ``{"threshold", "dice_pos", ...}`` (from
            :func:`weak2full.metrics.dice_vs_threshold`); every method must use the same thresholds.
        per_slice_dice: method -> (P,) Dice of each positive test slice; the same P for every method.
        roc: method -> ``(fpr, tpr)`` arrays (sklearn ``roc_curve``) of the image-level classifier.
        out_dir: the folder (``plots/``).

    Returns:
        ``{"dice_vs_threshold": path, "per_slice_dice": path, "roc/<method>": path, ...}`` for the files
        written (a mapping left empty writes no file). Declare them in dvc.yaml, e.g.
        ``plots/dice_vs_threshold.csv: {x: threshold, y: [segmenter, oracle]}``.
    """
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}

    if curves:
        methods = list(curves)
        grid = [float(r["threshold"]) for r in curves[methods[0]]]
        for m in methods[1:]:
            other = [float(r["threshold"]) for r in curves[m]]
            if other != grid:
                raise InvalidInputError(
                    f"dice-vs-threshold curves must share thresholds: '{methods[0]}' has {grid}, "
                    f"'{m}' has {other}."
                )
        rows = [[t] + [curves[m][i].get("dice_pos") for m in methods] for i, t in enumerate(grid)]
        path = out_dir / "dice_vs_threshold.csv"
        written["dice_vs_threshold"] = _write_csv(path, ["threshold"] + methods, rows)

    if per_slice_dice:
        methods = list(per_slice_dice)
        columns = [np.sort(np.asarray(per_slice_dice[m], dtype=np.float64)) for m in methods]
        sizes = {m: c.size for m, c in zip(methods, columns)}
        if len(set(sizes.values())) != 1:
            raise InvalidInputError(
                f"per-slice Dice must cover the same slices for every method, got sizes {sizes}."
            )
        n = columns[0].size
        fraction = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)
        rows = [[round(float(fraction[i]), 6)] + [float(c[i]) for c in columns] for i in range(n)]
        written["per_slice_dice"] = _write_csv(out_dir / "per_slice_dice.csv", ["fraction"] + methods, rows)

    for m, (fpr, tpr) in roc.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise InvalidInputError(
                f"roc['{m}']: fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D arrays."
            )
        rows = [[float(a), float(b)] for a, b in zip(fpr, tpr)]
        written[f"roc/{m}"] = _write_csv(out_dir / "roc" / f"{m}.csv", ["fpr", "tpr"], rows)
    return written


# ---------------------------------------------------------------------------------------- examples


def pick_examples(dice: np.ndarray, per_group: int = 1) -> list[tuple[str, int]]:
    """Indices of the best, median and worst slices by Dice, for the report's overlay rows.

    Args:
        dice: (P,) per-slice Dice of the slices to choose from (e.g. the segmenter's positive test slices).
        per_group: how many slices for each of best, median, worst (``evaluate.report_examples``).

    Returns:
        ``[("best", i), ..., ("median", j), ..., ("worst", k), ...]`` with indices into ``dice``; a slice
        appears once even when the groups would overlap on a short list.
    """
    dice = np.asarray(dice, dtype=np.float64)
    if dice.ndim != 1 or dice.size == 0:
        raise InvalidInputError(f"nothing to pick examples from: dice has shape {dice.shape}.")
    order = np.argsort(-dice, kind="stable")  # best first
    mid = (dice.size - per_group) // 2
    groups = {
        "best": order[:per_group],
        "median": order[max(mid, 0) : max(mid, 0) + per_group],
        "worst": order[::-1][:per_group],
    }
    picked, seen = [], set()
    for name, idx in groups.items():
        for i in idx.tolist():
            if i not in seen:
                seen.add(i)
                picked.append((name, i))
    return picked


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor=fig.get_facecolor())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)


def _fill(ax, mask: np.ndarray, colour: str, alpha: float) -> None:
    if mask.any():
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([colour]), alpha=alpha,
                  interpolation="nearest", vmin=0, vmax=1)


def _example_png(ex: Mapping, window: tuple[float, float]) -> str:
    """One row of panels: CT, heatmap, pseudo-mask, segmenter, truth; the truth outlined on the overlays."""
    image = apply_window(ex["image_hu"], *window)
    h, w = image.shape
    truth = np.asarray(ex["truth"]).astype(bool)
    if truth.shape != (h, w):
        raise InvalidInputError(
            f"example '{ex.get('title', '')}': truth {truth.shape} differs from image {(h, w)}."
        )
    untrusted = ex.get("pseudo_trusted") is False
    panels = [("CT (brain window)", None), ("heatmap", "heatmap"),
              ("pseudo-mask (untrusted)" if untrusted else "pseudo-mask", "pseudo_mask"),
              ("segmenter", "segmenter_pred"), ("truth", "truth")]
    panels = [(t, k) for t, k in panels if k is None or ex.get(k) is not None]
    fig = Figure(figsize=(2.3 * len(panels), 2.5), facecolor="white")
    axes = fig.subplots(1, len(panels))
    for ax, (title, key) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if key == "heatmap":
            heat = np.clip(np.asarray(ex["heatmap"], dtype=np.float32), 0.0, 1.0)
            # Opacity follows the map, so a cold map leaves the CT readable instead of painting it blue.
            rgba = colormaps["jet"](heat)
            rgba[..., 3] = 0.7 * heat
            # The map may be coarser than the slice: stretch it over the same pixel extent.
            ax.imshow(rgba, interpolation="bilinear", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        elif key == "pseudo_mask":
            pm = np.asarray(ex["pseudo_mask"])
            _fill(ax, pm == 255, UNLABELED_COLOUR, 0.35)
            _fill(ax, (pm > 0) & (pm != 255), PRED_COLOUR, 0.5)
        elif key == "segmenter_pred":
            _fill(ax, np.asarray(ex["segmenter_pred"]).astype(bool), PRED_COLOUR, 0.5)
        elif key == "truth":
            _fill(ax, truth, TRUTH_COLOUR, 0.45)
        if key not in (None, "truth"):  # the CT panel stays clean, as a reader would see the scan
            _outline(ax, truth, TRUTH_COLOUR)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02, wspace=0.04)
    return _png(fig)


def _curves_png(curves: Mapping[str, Sequence[Mapping]]) -> str:
    fig = Figure(figsize=(6.0, 3.4), facecolor="white")
    ax = fig.subplots()
    for m, records in curves.items():
        pts = [(r["threshold"], r["dice_pos"]) for r in records if r.get("dice_pos") is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", markersize=3, label=LABELS.get(m, m))
    ax.set_xlabel("threshold")
    ax.set_ylabel("dice_pos")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1150px; color: #1a1a1a; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
p.note { color: #555; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; margin-top: 8px; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 12px; }
th { background: #f3f3f3; text-align: right; } th:first-child, td:first-child { text-align: left; }
td { text-align: right; font-variant-numeric: tabular-nums; }
tr.ceiling td { color: #666; font-style: italic; }
.example { margin: 14px 0 22px 0; } .example h3 { font-size: 14px; margin: 0 0 4px 0; font-weight: 600; }
.example img, .curves img { max-width: 100%; display: block; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px -1px 12px; }
"""


def _html_table(table: Mapping) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for label, cells in _rows(table):
        cls = ' class="ceiling"' if label == LABELS["oracle"] else ""
        tds = "".join(f"<td>{html.escape(v)}</td>" for v in cells)
        body.append(f"<tr{cls}><td>{html.escape(label)}</td>{tds}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def _per_class_tables(table: Mapping) -> str:
    """One small table per class other than ``any`` that some method scored (empty string if none)."""
    classes = []
    for m in _methods(table):
        for cls in table[m].get("per_class", {}) or {}:
            if cls != "any" and cls not in classes:
                classes.append(cls)
    parts = []
    for cls in classes:
        sub = {
            m: table[m]["per_class"][cls]
            for m in _methods(table)
            if cls in (table[m].get("per_class") or {})
        }
        parts.append(f"<h3>{html.escape(cls)}</h3>{_html_table(sub)}")
    return "".join(parts)


def _counts_line(table: Mapping) -> str:
    methods = _methods(table)
    ref = table.get("segmenter") or table[methods[0]]
    keys = ("n_slices", "n_pos", "n_neg", "n_patients")
    if not all(k in ref for k in keys):
        return ""
    return (
        f"Scored on {ref['n_slices']} annotated test slices ({ref['n_pos']} with a bleed, {ref['n_neg']} "
        f"without) from {ref['n_patients']} patients."
    )


def write_html_report(
    path: str | Path,
    table: Mapping,
    examples: Sequence[Mapping],
    *,
    window: tuple[float, float] = (40.0, 80.0),
    curves: Mapping[str, Sequence[Mapping]] | None = None,
    title: str = "weak2full: weak-to-full segmentation report",
) -> Path:
    """Write one self-contained HTML report (no server, no side files: PNGs are embedded as base64).

    Args:
        path: the HTML file to write (e.g. ``reports/index.html``).
        table: the evaluate.json content (methods -> metrics, ``weak_over_full``).
        examples: overlay rows, in display order (see :func:`pick_examples`); each a dict with
            ``image_hu`` (H, W) HU, ``heatmap`` (S, S) in 0..1, ``pseudo_mask`` (H, W) uint8 (0, k, 255),
            ``segmenter_pred`` (H, W) bool, ``truth`` (H, W) bool, ``title`` str and ``dice`` float (the
            segmenter's Dice on that slice). ``heatmap``, ``pseudo_mask`` and ``segmenter_pred`` may be
            None; their panel is then left out. ``pseudo_trusted`` False marks the pseudo-mask as one
            the trust rule leaves out (caption and panel title say so).
        window: (level, width) HU window of the CT panels (brain 40/80).
        curves: optional ``dice_vs_threshold`` records per method, drawn as one chart.
        title: the page heading.

    Returns:
        ``path``.
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(_counts_line(table))} The oracle is trained on true masks: it is the '
        "ceiling, not a competitor. gap_cam, heatmap and pseudo_mask rows are label-informed (a slice "
        "labelled negative gets no foreground); segmenter and oracle see pixels only; the cascade is the "
        "segmenter with its mask kept only where the heatmap classifier's slice probability reaches a gate "
        "chosen on val.</p>",
        "<h2>Results (class any)</h2>",
        _html_table(table),
        f"<p>{html.escape(_ratio_line(table))}</p>",
    ]
    per_class = _per_class_tables(table)
    if per_class:
        parts += ["<h2>Per class</h2>", per_class]
    if curves:
        parts += ["<h2>Dice against the probability threshold</h2>",
                  f'<div class="curves"><img alt="dice_pos against threshold" '
                  f'src="data:image/png;base64,{_curves_png(curves)}"></div>']
    if examples:
        parts += [
            "<h2>Test slices: best, median, worst</h2>",
            '<p class="note legend">Window '
            f"{window[0]:g}/{window[1]:g} HU."
            f'<span style="background:{TRUTH_COLOUR}"></span>truth'
            f'<span style="background:{PRED_COLOUR}"></span>predicted'
            f'<span style="background:{UNLABELED_COLOUR}"></span>pseudo-mask unlabeled (ignored)</p>',
        ]
        for ex in examples:
            dice = ex.get("dice")
            caption = html.escape(str(ex.get("title", "")))
            if dice is not None:
                caption += f" &middot; segmenter Dice {float(dice):.2f}"
            if ex.get("pseudo_trusted") is False:  # the trust rule's flag (pseudo_masks.h5 ``trusted``)
                caption += " &middot; pseudo-mask untrusted (its map peaks below the cut-off)"
            parts.append(
                f'<div class="example"><h3>{caption}</h3>'
                f'<img alt="{html.escape(str(ex.get("title", "example")))}" '
                f'src="data:image/png;base64,{_example_png(ex, window)}"></div>'
            )
    parts.append("</body></html>\n")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
