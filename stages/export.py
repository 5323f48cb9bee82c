"""Stage export: a shippable pseudo-label dataset in dist/<export.name>/ (masks, labels, card, NIfTI)."""

from pathlib import Path

from weak2full import export
from weak2full.cli import run_stage, stage_parser


def main(argv=None):
    p = stage_parser(__doc__)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--pseudo", type=Path, required=True)
    p.add_argument("--metrics", type=Path, nargs="*", default=[], help="metrics JSON files for the card")
    p.add_argument("--out-root", type=Path, default=Path("dist"))
    args = p.parse_args(argv)
    run_stage(
        "export",
        lambda params, a: export.run(params, a.dataset, a.pseudo, a.metrics, a.out_root),
        args,
    )


if __name__ == "__main__":
    main()
