"""train_oracle: the same segmenter trained on the true masks of the train split - the ceiling.

With train_oracle.enabled false it writes a marker checkpoint (DVC needs the output) that loaders refuse.
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.train import run_oracle

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="dataset.h5 from prepare")
    parser.add_argument("--out", required=True, help="checkpoint to write (models/oracle.pt)")
    parser.add_argument("--live", default="dvclive/train_oracle", help="dvclive folder")
    parser.add_argument("--pretrained", default=None,
                        help="encoder weights from pretrain (models/pretrained/segmenter_encoder.pt), "
                             "used when encoder_weights is 'synthetic'")
    args = parser.parse_args()
    run_stage("train_oracle", lambda p, a: run_oracle(p, a.dataset, a.out, a.live, a.pretrained), args)
