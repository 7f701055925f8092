"""Local correlation (spatial-correlation-sampler semantics: kernel 1, stride 1, patch of displacements)."""

from .op import local_correlation
from .reference import local_correlation_reference

__all__ = ["local_correlation", "local_correlation_reference"]
