"""PromptAD's training loss, as the release computes it (README: Method).

Per head, with ``n``/``a`` the normal/anomaly prototypes, ``Â`` every anomaly prompt's normalised feature and
``s`` CLIP's raw ``logit_scale``:

- ``v2t``: cross-entropy of ``s · [f·n, f·Â]`` with the normal prototype as the target (every manual and learned
  anomaly prompt is a negative);
- ``eam``: the explicit anomaly margin, ``mean relu(Σ (f - n)² - Σ (f - a)² + margin)``, the sums over axis 1
  as the release's ``TripletLoss`` takes them: the feature axis for the image head's CLS features (B, E), the
  *patch* axis for the pixel head's patch features (B, N, E), a per-channel hinge (§7.3; most likely a bug of
  the release, kept because it produced the published numbers);
- ``align``: ``‖mean(normalize(manual)) - mean(normalize(learned))‖²``, weighted by ``lambda_align``.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from anomalib_faprompt.models.promptad.loss import PromptADLoss
    >>> from anomalib_faprompt.models.promptad.torch_model import HeadText
    >>> normal, manual, learned = torch.randn(3, 8), torch.randn(6, 8), torch.randn(4, 8)
    >>> prototypes = F.normalize(torch.stack([normal.mean(0), torch.cat([manual, learned]).mean(0)]), dim=-1)
    >>> text = HeadText(normal, manual, learned, prototypes)
    >>> terms = PromptADLoss()(F.normalize(torch.randn(2, 8), dim=-1), text, logit_scale=4.6)
    >>> sorted(terms)
    ['align', 'eam', 'eam_hinge_args', 'logits', 'loss', 'v2t']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .torch_model import HeadText


class PromptADLoss(nn.Module):
    """One head's loss terms.

    Args:
        lambda_align: Weight of the alignment of manual and learned anomaly prompts (the release's ``lambda1``).
        margin: Margin of the explicit anomaly margin loss (0 in the release).
    """

    def __init__(self, lambda_align: float = 0.001, margin: float = 0.0) -> None:
        super().__init__()
        self.lambda_align = lambda_align
        self.margin = margin

    def forward(self, features: torch.Tensor, text: HeadText, logit_scale: float) -> dict[str, torch.Tensor]:
        """Loss terms of normalised CLS features (B, E) or patch features (B, N, E) of normal images.

        Returns:
            ``v2t``, ``eam``, ``align`` and their total ``loss``; ``logits`` and ``eam_hinge_args`` for inspection.
        """
        normal, anomaly = text.prototypes[0], text.prototypes[1]
        candidates = torch.cat([normal[None], text.anomaly_prompts])
        logits = logit_scale * features @ candidates.t()
        targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        v2t = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
        hinge_args = (features - normal).pow(2).sum(dim=1) - (features - anomaly).pow(2).sum(dim=1) + self.margin
        eam = F.relu(hinge_args).mean()
        manual, learned = F.normalize(text.manual, dim=-1), F.normalize(text.learned, dim=-1)
        align = (manual.mean(dim=0) - learned.mean(dim=0)).pow(2).sum()
        loss = v2t + eam + self.lambda_align * align
        return {"loss": loss, "v2t": v2t, "eam": eam, "align": align, "logits": logits, "eam_hinge_args": hinge_args}
