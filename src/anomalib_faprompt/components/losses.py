"""Segmentation and classification losses of the released code (AnomalyCLIP and FAPrompt READMEs: Method)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss on two-channel probability maps (not logits), as in the release.

    The one-hot target is clamped to ``[smooth, 1 - smooth]``; ``pt = sum(onehot * p) + smooth``;
    the loss is ``-(1 - pt)^gamma * log(pt)`` averaged over pixels (alpha = 1).

    Example:
        >>> import torch
        >>> probabilities = torch.rand(2, 2, 8, 8).softmax(dim=1)
        >>> FocalLoss()(probabilities, torch.zeros(2, 8, 8)).shape
        torch.Size([])
    """

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Loss of maps (B, 2, H, W) against binary masks (B, H, W), in fp32 also under autocast."""
        probabilities = probabilities.float()
        target = F.one_hot(masks.long(), num_classes=probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        target = target.clamp(self.smooth, 1.0 - self.smooth)
        pt = (target * probabilities).sum(dim=1) + self.smooth
        return (-((1 - pt) ** self.gamma) * pt.log()).mean()


class BinaryDiceLoss(nn.Module):
    """Per-image ``1 - (2 sum(pg) + 1) / (sum(p) + sum(g) + 1)``, averaged over the batch."""

    def forward(self, probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of maps (B, H, W) against targets of the same shape, in fp32 also under autocast."""
        p, g = probabilities.float().flatten(1), targets.float().flatten(1)
        dice = (2 * (p * g).sum(dim=1) + 1) / (p.sum(dim=1) + g.sum(dim=1) + 1)
        return 1 - dice.mean()


class BinaryFocalLoss(nn.Module):
    """Binary focal loss with logits (alpha = 1), applied by FAPrompt to its fused score."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of logits (B,) against binary labels (B,), in fp32 also under autocast."""
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        return ((1 - torch.exp(-bce)) ** self.gamma * bce).mean()


def segmentation_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Focal(maps, G) + Dice(abnormal, G) + Dice(normal, 1 - G)`` for two-channel maps (B, 2, H, W)."""
    dice = BinaryDiceLoss()
    return FocalLoss()(maps, masks) + dice(maps[:, 1], masks) + dice(maps[:, 0], 1 - masks)
