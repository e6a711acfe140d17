"""Building blocks shared by the methods: smoothing, similarity maps, losses, visual memory."""

from .losses import BinaryDiceLoss, BinaryFocalLoss, FocalLoss, segmentation_loss
from .similarity import patch_similarity, similarity_logits, upsample_maps
from .smoothing import GaussianSmoothing
from .visual_memory import VisualMemory

__all__ = [
    "BinaryDiceLoss",
    "BinaryFocalLoss",
    "FocalLoss",
    "GaussianSmoothing",
    "VisualMemory",
    "patch_similarity",
    "segmentation_loss",
    "similarity_logits",
    "upsample_maps",
]
