"""On-device second-order Real-ESRGAN degradation of RASS (batched, jitted, static shapes).

from lqseg_jax.data_pipelines.degradation import degrade, get_config
lq = degrade(jax.random.key(0), images, get_config("rass"))  # images (B, H, W, 3) in [0, 1]
"""

from .config import PRESETS, get_config
from .pipeline import DegradationParams, degrade, min_image_side, rass_pair, sample_params

__all__ = [
    "PRESETS",
    "DegradationParams",
    "degrade",
    "get_config",
    "min_image_side",
    "rass_pair",
    "sample_params",
]
