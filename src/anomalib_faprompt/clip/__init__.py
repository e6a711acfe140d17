"""Shared CLIP surgery used by every method: weight loading, DPAM vision path, prompted text."""

from .loading import WeightsNotFoundError, build_clip, build_tokenizer, model_config
from .text import PromptedTextEncoder, PromptTemplate
from .vision import DPAMVisionEncoder, VisionFeatures

__all__ = [
    "DPAMVisionEncoder",
    "PromptTemplate",
    "PromptedTextEncoder",
    "VisionFeatures",
    "WeightsNotFoundError",
    "build_clip",
    "build_tokenizer",
    "model_config",
]
