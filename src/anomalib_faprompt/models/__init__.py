"""The methods, each in anomalib's model layout."""

from .anomaly_clip import AnomalyCLIP
from .faprompt import FAPrompt

__all__ = ["AnomalyCLIP", "FAPrompt"]
