"""Patch-text similarity maps as the released code computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_logits(features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cos(features, text) / temperature`` in fp32, also under autocast.

    At 1/temperature ≈ 14 a bf16 cosine would move the probabilities by percents.

    Args:
        features: L2-normalised image (B, E) or patch (B, N, E) features.
        text_features: L2-normalised text features (C, E) shared by the batch, or per image (B, C, E).
        temperature: Softmax temperature.

    Returns:
        Logits (B, C) or (B, N, C).
    """
    with torch.autocast(features.device.type, enabled=False):
        features, text_features = features.float(), text_features.float()
        if text_features.dim() == 2:
            return features @ text_features.t() / temperature
        if features.dim() == 2:
            return (features[:, None] @ text_features.transpose(1, 2)).squeeze(1) / temperature
        return features @ text_features.transpose(1, 2) / temperature


def patch_similarity(patch_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-patch softmax over the (normal, abnormal) text features.

    Args:
        patch_features: L2-normalised patch features (B, N, E), class token excluded.
        text_features: L2-normalised text features (2, E) shared by the batch, or (B, 2, E).
        temperature: Softmax temperature.

    Returns:
        Probabilities (B, N, 2) in fp32; channel 1 is the abnormal one.
    """
    return similarity_logits(patch_features, text_features, temperature).softmax(dim=-1)


def upsample_maps(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reshape (B, N, C) patch probabilities to the square grid and upsample to (B, C, H, W)."""
    batch, patches, channels = probabilities.shape
    side = round(patches**0.5)
    grid = probabilities.transpose(1, 2).reshape(batch, channels, side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
