"""pretrain: encoder weights learned on randomised synthetic head CT (the offline substitute for ImageNet).

Writes one weights file per network (the heatmap network's encoder, the segmenter's encoder) that the
training stages read when their encoder_weights is 'synthetic', or a marker when none does (pretraining
off), and metrics/pretrain.json (time, per-epoch losses and val scores).
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.pretrain import run

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--classifier-out", required=True,
                        help="heatmap encoder weights to write (models/pretrained/classifier_encoder.pt)")
    parser.add_argument("--segmenter-out", required=True,
                        help="segmenter encoder weights to write (models/pretrained/segmenter_encoder.pt)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/pretrain.json)")
    args = parser.parse_args()
    run_stage("pretrain", lambda p, a: run(p, a.classifier_out, a.segmenter_out, a.metrics), args)
