"""weak2full: image-level labels to pixel masks (heatmap CAMs -> CRF pseudo-masks -> segmenter)."""

from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.params import Params, load_params

__all__ = ["InvalidInputError", "InvalidParameterError", "Params", "load_params", "__version__"]
__version__ = "0.1.0"
