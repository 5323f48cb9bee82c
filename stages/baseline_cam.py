"""baseline_cam: the classic GAP-CAM classifier on the same data, to compare maps against.

Writes the selected checkpoint and the same val/test metrics as train_classifier.
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.train import run_baseline

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="dataset.h5 from prepare")
    parser.add_argument("--out", required=True, help="checkpoint to write (models/gap_cam.pt)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/baseline_cam.json)")
    parser.add_argument("--live", default="dvclive/baseline_cam", help="dvclive folder")
    parser.add_argument("--pretrained", default=None,
                        help="encoder weights from pretrain (models/pretrained/classifier_encoder.pt), "
                             "used when encoder_weights is 'synthetic'")
    args = parser.parse_args()
    run_stage("baseline_cam",
              lambda p, a: run_baseline(p, a.dataset, a.out, a.metrics, a.live, a.pretrained), args)
