"""AnomalyCLIP (ICLR 2024) as an anomalib model."""

from .lightning_model import AnomalyCLIP
from .torch_model import AnomalyCLIPModel

__all__ = ["AnomalyCLIP", "AnomalyCLIPModel"]
