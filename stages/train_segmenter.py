"""train_segmenter: an smp segmenter trained on the pseudo-masks of the train split (negatives included).

Selected by dice_pos on the annotated val slices.
"""

from weak2full.cli import run_stage, stage_parser
from weak2full.train import run_segmenter

if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="dataset.h5 from prepare")
    parser.add_argument("--pseudo", required=True, help="pseudo_masks.h5 from pseudo_masks")
    parser.add_argument("--out", required=True, help="checkpoint to write (models/segmenter.pt)")
    parser.add_argument("--live", default="dvclive/train_segmenter", help="dvclive folder")
    parser.add_argument("--pretrained", default=None,
                        help="encoder weights from pretrain (models/pretrained/segmenter_encoder.pt), "
                             "used when encoder_weights is 'synthetic'")
    args = parser.parse_args()
    run_stage("train_segmenter",
              lambda p, a: run_segmenter(p, a.dataset, a.pseudo, a.out, a.live, a.pretrained), args)
