"""Multi-scale deformable attention (Deformable-DETR / Mask2Former MSDeformAttn)."""

from .op import ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
