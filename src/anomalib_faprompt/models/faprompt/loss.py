"""FAPrompt training loss (README: Method, Paper vs. release).

``[Focal(S) + Dice(S_a, G) + Dice(S_n, 1−G)] + ½[Focal(Ŝ) + Dice(Ŝ_a, G) + Dice(Ŝ_n, 1−G)]
+ CE(p̂ logits, y) + BinaryFocal(s, y) + 0.1·L_oc + L_prior``.

Example:
    >>> import torch
    >>> loss = FAPromptLoss()
    >>> maps = torch.rand(2, 2, 8, 8).softmax(dim=1)
    >>> terms = loss(maps, maps, torch.randn(2, 2), torch.rand(2), torch.randn(3, 4), torch.randn(2, 4),
    ...              torch.zeros(2, 8, 8), torch.tensor([0, 1]))
    >>> sorted(terms)
    ['loss', 'loss_image', 'loss_image2', 'loss_local', 'loss_orth', 'loss_prior']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_faprompt.components.losses import BinaryFocalLoss, segmentation_loss


def orthogonality_loss(abnormal_features: torch.Tensor) -> torch.Tensor:
    """Sum over pairs i < j of |cos| between the K static abnormal text features (K, E), in fp32."""
    with torch.autocast(abnormal_features.device.type, enabled=False):
        normalised = F.normalize(abnormal_features.float(), dim=-1)
        cosine = normalised @ normalised.t()
        return cosine.triu(diagonal=1).abs().sum()


class FAPromptLoss(nn.Module):
    """All terms of the released FAPrompt objective.

    Args:
        dap_weight: Factor on the DAP map's segmentation loss.
        orthogonality_weight: Factor on the orthogonality loss of the abnormal prompts.
    """

    def __init__(self, dap_weight: float = 0.5, orthogonality_weight: float = 0.1) -> None:
        super().__init__()
        self.dap_weight = dap_weight
        self.orthogonality_weight = orthogonality_weight
        self.binary_focal = BinaryFocalLoss()

    def forward(
        self,
        static_maps: torch.Tensor,
        dap_maps: torch.Tensor,
        image_logits: torch.Tensor,
        score: torch.Tensor,
        abnormal_features: torch.Tensor,
        prior: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        shards: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Return the total loss and its terms.

        Args:
            static_maps: Upsampled two-channel static maps S (B, 2, H, W).
            dap_maps: Upsampled two-channel DAP maps Ŝ (B, 2, H, W).
            image_logits: Image-text logits with the DAP text, divided by the temperature (B, 2).
            score: Fused image score s (B,).
            abnormal_features: Static features of the K abnormal prompts (K, E).
            prior: Prior network output Ω (B, T).
            masks: Binary ground-truth masks (B, H, W).
            labels: Image labels (B,), 1 for anomalous.
            shards: Processes the global batch is split over (DDP). Every term but the prior's averages over the
                batch, and DDP averages gradients over processes, which gives the global batch's mean. The prior
                term *sums* over the normal images of the batch, so each process counts its part ``shards`` times.
        """
        loss_local = segmentation_loss(static_maps, masks) + self.dap_weight * segmentation_loss(dap_maps, masks)
        loss_image = F.cross_entropy(image_logits, labels.long())
        loss_image2 = self.binary_focal(score, labels)
        loss_orth = orthogonality_loss(abnormal_features)
        loss_prior = shards * (prior.pow(2).mean(dim=-1) * (labels == 0).to(prior.dtype)).sum()
        total = loss_local + loss_image + loss_image2 + self.orthogonality_weight * loss_orth + loss_prior
        return {
            "loss": total,
            "loss_local": loss_local,
            "loss_image": loss_image,
            "loss_image2": loss_image2,
            "loss_orth": loss_orth,
            "loss_prior": loss_prior,
        }
