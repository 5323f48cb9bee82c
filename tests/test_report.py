"""weak2full.report and `python -m weak2full results`: the table, the plot files, the HTML report."""

import base64
import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from weak2full.__main__ import main
from weak2full.errors import InvalidInputError
from weak2full.report import format_results_table, pick_examples, write_html_report, write_plots

TABLE = {
    "gap_cam": {"dice_pos": 0.1, "dice_patient": 0.12, "iou_pos": 0.05, "fp_slice_rate": 0.0, "hd95": 30.25,
                "point_acc": 0.05, "auroc": 0.8125, "n_slices": 40, "n_pos": 8, "n_neg": 32, "n_patients": 4,
                "per_class": {}},
    "heatmap": {"dice_pos": 0.2, "dice_patient": None, "iou_pos": 0.11, "fp_slice_rate": 0.0, "hd95": 18.0,
                "point_acc": 0.5, "per_class": {}},
    "segmenter": {"dice_pos": 0.4, "dice_pos_ci95": {"low": 0.31, "high": 0.4925}, "dice_patient": 0.45,
                  "iou_pos": 0.28, "fp_slice_rate": 0.07, "hd95": 9.84, "n_slices": 40, "n_pos": 8,
                  "n_neg": 32, "n_patients": 4,
                  "per_class": {"subdural": {"dice_pos": 0.3, "hd95": 4.0}}},
    "oracle": {"dice_pos": 0.5, "dice_patient": 0.6, "iou_pos": 0.41, "fp_slice_rate": 0.03, "hd95": 6.0,
               "per_class": {}},
    "weak_over_full": 0.8,
    "weak_over_full_ci95": {"low": 0.6, "high": 1.05},
}


def test_results_table_is_markdown_with_blanks_and_the_ceiling_label():
    text = format_results_table(TABLE)
    lines = text.splitlines()
    assert lines[0] == ("| method | dice_pos | dice_pos_ci95 | dice_patient | iou_pos | fp_slice_rate | hd95 "
                        "| point_acc | auroc |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| gap_cam | 0.100 |  | 0.120 | 0.050 | 0.000 | 30.2 | 0.050 | 0.812 |"
    assert lines[3] == "| heatmap | 0.200 |  |  | 0.110 | 0.000 | 18.0 | 0.500 |  |"  # None: blank
    # point_acc and auroc absent: blank
    assert lines[4] == "| segmenter | 0.400 | 0.310–0.492 | 0.450 | 0.280 | 0.070 | 9.8 |  |  |"
    assert lines[5] == "| oracle (ceiling) | 0.500 |  | 0.600 | 0.410 | 0.030 | 6.0 |  |  |"
    assert len(lines) == 8  # the interval of the ratio is no method row
    assert lines[7] == ("weak_over_full: 0.800 (segmenter dice_pos / oracle dice_pos); 95% interval over "
                        "test patients 0.600–1.050")
    assert "pseudo_mask" not in text  # a method missing from the file has no row


def test_results_command_prints_the_table(tmp_path, capsys):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps(TABLE))
    assert main(["results", "--metrics", str(path)]) == 0
    assert capsys.readouterr().out == format_results_table(TABLE)


def test_results_command_errors_are_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["results", "--metrics", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"weak2full results: error: {missing} does not exist: run `dvc repro evaluate` first "
        "(or pass --metrics)."
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["results", "--metrics", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"weak_over_full": 1.0}))
    assert main(["results", "--metrics", str(bad)]) == 2
    assert "the results hold no method entries" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps(TABLE))
    done = subprocess.run([sys.executable, "-m", "weak2full", "results", "--metrics", str(path)],
                          capture_output=True, text=True, check=True)
    assert "| oracle (ceiling) |" in done.stdout


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_plots_files(tmp_path):
    grid = [0.25, 0.5, 0.75]
    curves = {m: [{"threshold": t, "dice_pos": d} for t, d in zip(grid, ds)]
              for m, ds in {"segmenter": [0.2, 0.4, None], "oracle": [0.3, 0.5, 0.4]}.items()}
    per_slice = {"segmenter": np.array([0.9, 0.1, 0.5]), "oracle": np.array([1.0, 0.0, 0.5])}
    roc = {"heatmap": (np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0]))}
    written = write_plots(curves, per_slice, roc, tmp_path / "plots")
    assert set(written) == {"dice_vs_threshold", "per_slice_dice", "roc/heatmap"}
    rows = read_csv(tmp_path / "plots" / "dice_vs_threshold.csv")
    assert rows[0] == {"threshold": "0.25", "segmenter": "0.2", "oracle": "0.3"}
    assert rows[2]["segmenter"] == ""  # undefined Dice: an empty cell, not NaN
    rows = read_csv(tmp_path / "plots" / "per_slice_dice.csv")
    assert [r["fraction"] for r in rows] == ["0.0", "0.5", "1.0"]
    assert [float(r["segmenter"]) for r in rows] == [0.1, 0.5, 0.9]  # sorted: a quantile curve
    assert read_csv(tmp_path / "plots" / "roc" / "heatmap.csv")[1] == {"fpr": "0.5", "tpr": "1.0"}
    assert not list((tmp_path / "plots").glob(".*tmp*"))


def test_write_plots_rejects_mismatched_curves(tmp_path):
    curves = {"a": [{"threshold": 0.5, "dice_pos": 0.1}], "b": [{"threshold": 0.4, "dice_pos": 0.1}]}
    with pytest.raises(InvalidInputError, match="curves must share thresholds: 'a' has \\[0.5\\], 'b' has"):
        write_plots(curves, {}, {}, tmp_path)
    with pytest.raises(InvalidInputError, match="same slices for every method"):
        write_plots({}, {"a": np.zeros(2), "b": np.zeros(3)}, {}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_pick_examples_best_median_worst():
    dice = np.array([0.5, 0.9, 0.1, 0.7, 0.3])
    assert pick_examples(dice) == [("best", 1), ("median", 0), ("worst", 2)]
    assert pick_examples(np.array([0.2, 0.8]), per_group=2) == [("best", 1), ("best", 0)]
    with pytest.raises(InvalidInputError, match="nothing to pick examples from"):
        pick_examples(np.zeros(0))


def example(title, dice, with_pseudo=True):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    truth = np.hypot(yy - 12, xx - 14) < 4
    image = np.where(np.hypot(yy - 16, xx - 16) < 14, 35.0, -1000.0) + rng.normal(0, 3, (32, 32))
    image[truth] = 60.0
    pm = np.zeros((32, 32), np.uint8)
    pm[8:18, 8:20] = 255
    pm[truth] = 1
    heat = np.exp(-((yy[::4, ::4] - 12) ** 2 + (xx[::4, ::4] - 14) ** 2) / 30.0)  # an 8x8 map
    return {"image_hu": image, "heatmap": heat,
            "pseudo_mask": pm if with_pseudo else None, "segmenter_pred": np.roll(truth, 1, axis=1),
            "truth": truth, "title": title, "dice": dice}


def test_html_report_is_one_self_contained_file(tmp_path):
    path = tmp_path / "reports" / "index.html"
    curves = {"segmenter": [{"threshold": 0.5, "dice_pos": 0.4}]}
    examples = [example("best: <patient 3>", 0.9), example("worst", 0.1, with_pseudo=False)]
    examples[0]["pseudo_trusted"] = True
    examples[1]["pseudo_trusted"] = False
    assert write_html_report(path, TABLE, examples, curves=curves) == path
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]  # no side files, no temp left
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3  # the curves chart and two overlay rows
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from disk or network
    assert "oracle (ceiling)" in text and "weak_over_full: 0.800" in text
    assert "best: &lt;patient 3&gt; &middot; segmenter Dice 0.90</h3>" in text  # titles are escaped
    assert "worst &middot; segmenter Dice 0.10 &middot; pseudo-mask untrusted" in text  # the trust flag
    assert "<h3>subdural</h3>" in text  # the per-class table
    assert "Scored on 40 annotated test slices (8 with a bleed, 32 without) from 4 patients." in text


def test_html_report_checks_example_shapes(tmp_path):
    bad = example("bad", 0.5)
    bad["truth"] = bad["truth"][:16]
    with pytest.raises(InvalidInputError, match=r"example 'bad': truth \(16, 32\) differs from image"):
        write_html_report(tmp_path / "index.html", TABLE, [bad])
    assert not any(tmp_path.iterdir())  # nothing half-written
