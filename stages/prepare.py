"""prepare: build data/prepared/dataset.h5 (HU slices, labels, masks, splits) from `data.source`.

Reads params `common.seed` and `data`; writes the dataset and a montage of example slices.
"""

from pathlib import Path

from weak2full import prepare
from weak2full.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="dataset.h5 to write")
    parser.add_argument("--montage", type=Path, default=None, help="PNG of example slices to write")
    args = parser.parse_args()
    run_stage("prepare", lambda params, a: prepare.run(params, a.out, a.montage), args)


if __name__ == "__main__":
    main()
