"""train_classifier: the heatmap network trained on image-level labels only.

Writes the selected checkpoint (best localisation on annotated val slices) and its val/test metrics.
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.train import run_classifier

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="dataset.h5 from prepare")
    parser.add_argument("--out", required=True, help="checkpoint to write (models/classifier.pt)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/classifier.json)")
    parser.add_argument("--live", default="dvclive/train_classifier", help="dvclive folder")
    parser.add_argument("--pretrained", default=None,
                        help="encoder weights from pretrain (models/pretrained/classifier_encoder.pt), "
                             "used when encoder_weights is 'synthetic'")
    args = parser.parse_args()
    run_stage("train_classifier",
              lambda p, a: run_classifier(p, a.dataset, a.out, a.metrics, a.live, a.pretrained), args)
