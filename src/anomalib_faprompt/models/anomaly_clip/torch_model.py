"""PyTorch model of AnomalyCLIP: object-agnostic prompts on a DPAM CLIP (SPEC §3).

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
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.clip.settings import backbone_geometry
from anomalib_faprompt.components import GaussianSmoothing, patch_similarity, similarity_logits, upsample_maps

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
    """

    text_features: torch.Tensor
    image_features: torch.Tensor
    image_logits: torch.Tensor
    layer_maps: list[torch.Tensor]

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
    ) -> None:
        geometry = backbone_geometry(backbone)
        n_ctx = geometry.check_context("n_ctx", n_ctx, TEMPLATE_TOKENS)
        smoothing = GaussianSmoothing(sigma, max_size=geometry.check_image_size(image_size))
        super().__init__(
            backbone, pretrained, image_size, dpam_layers, text_depth, text_n_ctx, temperature, feature_layers
        )
        placeholders = "X " * n_ctx
        self.normal_template = self.text.template(f"{placeholders}object.", n_ctx)
        self.abnormal_template = self.text.template(f"{placeholders}damaged object.", n_ctx)
        self.normal_context = nn.Parameter(torch.randn(n_ctx, self.text.width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(n_ctx, self.text.width) * 0.02)
        self.smoothing = smoothing

    prompt_dimensions: ClassVar[dict[str, tuple[str, ...]]] = {
        **PromptedCLIP.prompt_dimensions,
        "normal_context": ("n_ctx", "text width of the backbone"),
        "abnormal_context": ("n_ctx", "text width of the backbone"),
    }

    def convert_released_state_dict(self, prompt_learner: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the released ``prompt_learner`` (``ctx_pos``, ``ctx_neg``, deep prompts) to this model."""
        if "patch_meta_net.linear1.weight" in prompt_learner:
            msg = "This is a FAPrompt prompt checkpoint; load it with FAPrompt(prompt_weights=...), not AnomalyCLIP."
            raise ValueError(msg)
        state_dict = super().convert_released_state_dict(prompt_learner)
        state_dict["normal_context"] = prompt_learner["ctx_pos"].reshape(-1, prompt_learner["ctx_pos"].shape[-1])
        state_dict["abnormal_context"] = prompt_learner["ctx_neg"].reshape(-1, prompt_learner["ctx_neg"].shape[-1])
        return state_dict

    def encode_text(self) -> torch.Tensor:
        """Normalised (normal, abnormal) text features (2, E), both prompts in one encoder call."""
        normal, abnormal = self.encode_prompts(
            (self.normal_template, self.normal_context), (self.abnormal_template, self.abnormal_context)
        )
        return F.normalize(torch.stack([normal, abnormal]), dim=-1)

    def forward_features(self, images: torch.Tensor) -> AnomalyCLIPOutput:
        """Run the model and return every intermediate the loss needs."""
        self.check_input(images)
        text_features = self.cached(self.encode_text)
        image_features, patch_features = self.encode_image(images, self.feature_layers)
        image_logits = similarity_logits(image_features, text_features, self.temperature)
        size = (images.shape[-2], images.shape[-1])
        layer_maps = [
            upsample_maps(patch_similarity(features, text_features, self.temperature), size)
            for features in patch_features
        ]
        return AnomalyCLIPOutput(text_features, image_features, image_logits, layer_maps)

    def forward(self, images: torch.Tensor) -> InferenceBatch | AnomalyCLIPOutput:
        """Score images: ``InferenceBatch(pred_score, anomaly_map)`` in eval mode, intermediates in training."""
        output = self.forward_features(images)
        if self.training:
            return output
        return InferenceBatch(pred_score=output.pred_score, anomaly_map=self.smoothing(output.anomaly_map))
