"""Stage evaluate: every method on the same annotated test slices -> metrics/evaluate.json, plots, report."""

from pathlib import Path

from weak2full import evaluate
from weak2full.cli import run_stage, stage_parser


def main(argv=None):
    p = stage_parser(__doc__)
    for flag in ("--dataset", "--heatmap-cams", "--gap-cams", "--pseudo", "--segmenter", "--oracle", "--out",
                 "--plots", "--report"):
        p.add_argument(flag, type=Path, required=True)
    args = p.parse_args(argv)
    run_stage(
        "evaluate",
        lambda params, a: evaluate.run(params, a.dataset, a.heatmap_cams, a.gap_cams, a.pseudo, a.segmenter,
                                       a.oracle, a.out, a.plots, a.report),
        args,
    )


if __name__ == "__main__":
    main()
