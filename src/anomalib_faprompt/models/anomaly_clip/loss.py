"""AnomalyCLIP training loss (README: Method, Paper vs. release).

``4 · Σ_layers [Focal + Dice(s_a, G) + Dice(s_n, 1 − G)] + CE(image logits, y)``.

Example:
    >>> import torch
    >>> loss = AnomalyCLIPLoss()
    >>> maps = [torch.rand(2, 2, 8, 8).softmax(dim=1)]
    >>> terms = loss(maps, torch.randn(2, 2), torch.zeros(2, 8, 8), torch.tensor([0, 1]))
    >>> sorted(terms)
    ['loss', 'loss_image', 'loss_local']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_faprompt.components.losses import segmentation_loss


class AnomalyCLIPLoss(nn.Module):
    """Local (segmentation) and global (classification) loss of the release.

    Args:
        local_weight: Factor on the summed per-layer segmentation losses (4 in the release).
    """

    def __init__(self, local_weight: float = 4.0) -> None:
        super().__init__()
        self.local_weight = local_weight

    def forward(
        self,
        layer_maps: list[torch.Tensor],
        image_logits: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return the total loss and its terms.

        Args:
            layer_maps: Per layer, upsampled two-channel probability maps (B, 2, H, W).
            image_logits: Image-text logits already divided by the temperature (B, 2).
            masks: Binary ground-truth masks (B, H, W).
            labels: Image labels (B,), 1 for anomalous.
        """
        loss_local = torch.stack([segmentation_loss(maps, masks) for maps in layer_maps]).sum()
        loss_image = F.cross_entropy(image_logits, labels.long())
        return {
            "loss": self.local_weight * loss_local + loss_image,
            "loss_local": loss_local,
            "loss_image": loss_image,
        }
