"""pseudo_masks stage: class maps -> thresholds -> dense CRF -> pseudo_masks.h5 (+ metrics, calibration).

    python stages/pseudo_masks.py --dataset data/prepared/dataset.h5 --cams data/cams/cams.h5 \
        --out data/pseudo/pseudo_masks.h5 --metrics metrics/pseudo_masks.json \
        --calibration metrics/calibration.json --plots plots/calibration

Reads params `common.classes` and `pseudo_masks.*`. `--plots` gets calibration.csv and calibration.png.
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.pseudo_masks import run


def main(argv=None):
    p = stage_parser(__doc__)
    p.add_argument("--dataset", required=True, help="dataset.h5 (prepare)")
    p.add_argument("--cams", required=True, help="cams.h5 (cams stage, heatmap network)")
    p.add_argument("--out", required=True, help="pseudo_masks.h5 to write")
    p.add_argument("--metrics", required=True, help="metrics JSON (raw vs CRF scores)")
    p.add_argument("--calibration", required=True, help="calibration JSON (choice + search table)")
    p.add_argument("--plots", default=None, help="folder for calibration.csv (dvc plots) and calibration.png")
    args = p.parse_args(argv)
    run_stage(
        "pseudo_masks",
        lambda params, a: run(params, a.dataset, a.cams, a.out, a.metrics, a.calibration, a.plots),
        args,
    )


if __name__ == "__main__":
    main()
