"""FAPrompt (ICCV 2025) as an anomalib model."""

from .lightning_model import FAPrompt
from .torch_model import FAPromptModel

__all__ = ["FAPrompt", "FAPromptModel"]
