"""PyTorch model of AnomalyCLIP: object-agnostic prompts on a DPAM CLIP (README: Method, Paper vs. release).

Example:
    >>> import torch
    >>> from anomalib_faprompt.models.anomaly_clip.torch_model import AnomalyCLIPModel
    >>> model = AnomalyCLIPModel(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10).eval()
    >>> model.feature_layers  # the last of ViT-B/16's 12 blocks
    (12,)
    >>> output = model(torch.randn(2, 3, 224, 224))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 224, 224]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.clip.settings import backbone_geometry
from anomalib_faprompt.components import patch_similarity, similarity_logits, upsample_maps

#: Tokens of the abnormal template's fixed words, "damaged object." (CLIP's BPE: damaged, object, ".").
TEMPLATE_TOKENS = 3


@dataclass
class AnomalyCLIPOutput:
    """Intermediate outputs used by the loss and the parity tests.

    Attributes:
        text_features: Normalised (normal, abnormal) text features (2, E).
        image_features: Normalised global image features (B, E).
        image_logits: ``cos(image, text) / temperature`` (B, 2).
        layer_maps: Per feature layer, upsampled two-channel probability maps (B, 2, H, W).
        patch_features: Per feature layer, normalised patch features (B, N, E).
    """

    text_features: torch.Tensor
    image_features: torch.Tensor
    image_logits: torch.Tensor
    layer_maps: list[torch.Tensor]
    patch_features: list[torch.Tensor] | None = None

    @property
    def pred_score(self) -> torch.Tensor:
        """Abnormal probability of the image (B,)."""
        return self.image_logits.softmax(dim=-1)[:, 1]

    @property
    def anomaly_map(self) -> torch.Tensor:
        """Abnormal channel summed over layers, before smoothing (B, H, W)."""
        return torch.stack([maps[:, 1] for maps in self.layer_maps]).sum(dim=0)


class AnomalyCLIPModel(PromptedCLIP):
    """AnomalyCLIP: learnable normal/abnormal contexts around ``object`` plus deep text prompts.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip tag, weights file, or ``None`` for random weights.
        image_size: Square input size.
        feature_layers: 1-indexed vision blocks whose patch features make the maps; ``None`` (the default)
            is the last block, the released method. ``(6, 12, 18, 24)`` is the paper's four-layer variant
            for ViT-L/14.
        dpam_layers: Number of final vision blocks running the V-V path.
        n_ctx: Length of the learnable normal and abnormal contexts.
        text_depth: Text blocks that see deep prompts (the first sees the template's own embeddings).
        text_n_ctx: Length of each deep prompt.
        sigma: Gaussian smoothing of the map in pixels (0 disables it).
        temperature: Softmax temperature.
        reference_weight: Weight of few-shot references' visual memory in the fused map and score (see
            :meth:`PromptedCLIP.forward`).

    Raises:
        ValueError: If a setting is out of range (for the backbone); raised before any weights load.
    """

    def __init__(
        self,
        backbone: str | Path = "ViT-L-14-336",
        pretrained: str | Path | None = "openai",
        image_size: int = 518,
        feature_layers: Sequence[int] | None = None,
        dpam_layers: int = 19,
        n_ctx: int = 12,
        text_depth: int = 9,
        text_n_ctx: int = 4,
        sigma: float = 4.0,
        temperature: float = 0.07,
        reference_weight: float = 0.5,
    ) -> None:
        n_ctx = backbone_geometry(backbone).check_context("n_ctx", n_ctx, TEMPLATE_TOKENS)
        super().__init__(
            backbone,
            pretrained,
            image_size,
            dpam_layers,
            text_depth,
            text_n_ctx,
            temperature,
            feature_layers,
            sigma=sigma,
            reference_weight=reference_weight,
        )
        placeholders = "X " * n_ctx
        self.normal_template = self.text.template(f"{placeholders}object.", n_ctx)
        self.abnormal_template = self.text.template(f"{placeholders}damaged object.", n_ctx)
        self.normal_context = nn.Parameter(torch.randn(n_ctx, self.text.width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(n_ctx, self.text.width) * 0.02)

    prompt_dimensions: ClassVar[dict[str, tuple[str, ...]]] = {
        **PromptedCLIP.prompt_dimensions,
        "normal_context": ("n_ctx", "text width of the backbone"),
        "abnormal_context": ("n_ctx", "text width of the backbone"),
    }

    def convert_released_state_dict(self, prompt_learner: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the released ``prompt_learner`` (``ctx_pos``, ``ctx_neg``, deep prompts) to this model.

        Which method a released file belongs to is decided before, by the key signatures of
        :data:`anomalib_faprompt.methods.METHODS` (``prompt_weights.load_prompt_weights``).
        """
        state_dict = super().convert_released_state_dict(prompt_learner)
        state_dict["normal_context"] = prompt_learner["ctx_pos"].reshape(-1, prompt_learner["ctx_pos"].shape[-1])
        state_dict["abnormal_context"] = prompt_learner["ctx_neg"].reshape(-1, prompt_learner["ctx_neg"].shape[-1])
        return state_dict

    def encode_static_text(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E), both prompts in one encoder call."""
        normal, abnormal = self.encode_prompts(
            (self.normal_template, self.normal_context), (self.abnormal_template, self.abnormal_context)
        )
        return F.normalize(torch.stack([normal, abnormal]), dim=-1)

    def score_features(
        self,
        image_size: tuple[int, int],
        text: torch.Tensor,
        image_features: torch.Tensor,
        patch_features: list[torch.Tensor],
    ) -> AnomalyCLIPOutput:
        """Image score from the global feature; per feature layer, a two-channel map from the patches."""
        image_logits = similarity_logits(image_features, text, self.temperature)
        layer_maps = [
            upsample_maps(patch_similarity(features, text, self.temperature), image_size) for features in patch_features
        ]
        return AnomalyCLIPOutput(text, image_features, image_logits, layer_maps)
