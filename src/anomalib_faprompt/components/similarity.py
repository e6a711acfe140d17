"""Patch-text similarity maps as the released code computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_similarity(patch_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-patch softmax over the (normal, abnormal) text features.

    Args:
        patch_features: L2-normalised patch features (B, N, E), class token excluded.
        text_features: L2-normalised text features (2, E) shared by the batch, or (B, 2, E).
        temperature: Softmax temperature.

    Returns:
        Probabilities (B, N, 2); channel 1 is the abnormal one.
    """
    if text_features.dim() == 2:
        logits = patch_features @ text_features.t()
    else:
        logits = patch_features @ text_features.transpose(1, 2)
    return (logits / temperature).softmax(dim=-1)


def upsample_maps(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reshape (B, N, C) patch probabilities to the square grid and upsample to (B, C, H, W)."""
    batch, patches, channels = probabilities.shape
    side = round(patches**0.5)
    grid = probabilities.transpose(1, 2).reshape(batch, channels, side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
