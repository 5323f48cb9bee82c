"""cams: class maps of every slice from a trained classifier, streamed into one HDF5 (cams.h5 contract)."""

from weak2full.cams import run
from weak2full.cli import run_stage, stage_parser

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True, help="classifier or gap_cam checkpoint")
    parser.add_argument("--method", choices=["heatmap", "gap_cam"], default=None,
                        help="which network the checkpoint holds (default: read from the checkpoint)")
    parser.add_argument("--dataset", required=True, help="dataset.h5 from prepare")
    parser.add_argument("--out", required=True, help="cams.h5 to write")
    args = parser.parse_args()
    run_stage("cams", lambda p, a: run(p, a.model, a.dataset, a.out, a.method), args)
