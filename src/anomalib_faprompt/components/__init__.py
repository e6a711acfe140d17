"""Building blocks shared by the methods: smoothing, similarity maps, losses."""

from .losses import BinaryDiceLoss, BinaryFocalLoss, FocalLoss, segmentation_loss
from .similarity import patch_similarity, similarity_logits, upsample_maps
from .smoothing import GaussianSmoothing

__all__ = [
    "BinaryDiceLoss",
    "BinaryFocalLoss",
    "FocalLoss",
    "GaussianSmoothing",
    "patch_similarity",
    "segmentation_loss",
    "similarity_logits",
    "upsample_maps",
]
