"""The OneRec encoder-decoder: presets, the four-pathway encoder, the MoE decoder, constrained generation."""

from onerec_fast.model.config import PARAM_MARGIN, PRESETS, OneRecConfig, nominal_parameters
from onerec_fast.model.decoder import DecodeState, OneRecDecoder
from onerec_fast.model.encoder import EncoderOutput, OneRecEncoder, PaddedItems
from onerec_fast.model.onerec import GenerateOutput, OneRec, features_from_dataset

__all__ = [
    "PARAM_MARGIN",
    "PRESETS",
    "DecodeState",
    "EncoderOutput",
    "GenerateOutput",
    "OneRec",
    "OneRecConfig",
    "OneRecDecoder",
    "OneRecEncoder",
    "PaddedItems",
    "features_from_dataset",
    "nominal_parameters",
]
