"""Mask2Former head (pixel decoder + masked-attention transformer decoder), matcher, criterion, inference."""

from .config import Mask2FormerConfig, rass_config, tiny_config
from .criterion import Mask2FormerCriterion
from .head import Mask2FormerHead
from .inference import semantic_inference
from .matcher import SemanticTargets, hungarian_match, linear_sum_assignment, targets_from_semantic
from .pixel_decoder import MSDeformAttn, MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder, stack_predictions

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerConfig",
    "Mask2FormerCriterion",
    "Mask2FormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "SemanticTargets",
    "hungarian_match",
    "linear_sum_assignment",
    "rass_config",
    "semantic_inference",
    "stack_predictions",
    "targets_from_semantic",
    "tiny_config",
]
