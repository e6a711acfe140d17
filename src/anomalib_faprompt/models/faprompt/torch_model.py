"""PyTorch model of FAPrompt: compound and data-dependent abnormality prompts (README: Method, Paper vs. release).

Compound abnormality prompts (CAP) share the normal context and add K abnormal contexts; the
static abnormal text feature is their mean. Data-dependent abnormality prompts (DAP) select
the M patches most abnormal under the static map, feed their features through a small prior
network, and shift every abnormal context by its output Ω before re-encoding. The DAP text of
a whole batch (B × K prompts) is encoded in one call; the normal prompt is never re-encoded.

Example:
    >>> import torch
    >>> from anomalib_faprompt.models.faprompt.torch_model import FAPromptModel
    >>> model = FAPromptModel(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10).eval()
    >>> output = model(torch.randn(2, 3, 224, 224))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 224, 224]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.clip.settings import backbone_geometry, check_int
from anomalib_faprompt.components import patch_similarity, similarity_logits, upsample_maps

#: Tokens of the abnormal template's fixed words, "damaged object." (CLIP's BPE: damaged, object, ".").
TEMPLATE_TOKENS = 3


@dataclass
class StaticText:
    """Text features that do not depend on the image.

    Attributes:
        normal: Un-normalised normal feature (1, E).
        abnormal_each: Un-normalised feature of each of the K abnormal prompts (K, E).
        pair: Normalised (normal, mean abnormal) features (2, E).
    """

    normal: torch.Tensor
    abnormal_each: torch.Tensor
    pair: torch.Tensor


@dataclass
class FAPromptOutput:
    """Intermediate outputs used by the loss and the parity tests.

    Attributes:
        static_text: Image-independent text features.
        dap_text: Per-image normalised (normal, DAP abnormal) text features (B, 2, E).
        selected_patches: Features of the M selected patches, most abnormal first (B, M, E).
        prior: Output Ω of the prior network (B, T).
        image_logits: ``cos(image, dap_text) / temperature`` (B, 2).
        static_maps: Upsampled two-channel static maps S (B, 2, H, W).
        dap_maps: Upsampled two-channel DAP maps Ŝ (B, 2, H, W).
        score_logit: Fused image score s (B,), the released code's input to the binary focal loss.
        patch_features: Normalised patch features of the last block, in a one-element list (B, N, E).
    """

    static_text: StaticText
    dap_text: torch.Tensor
    selected_patches: torch.Tensor
    prior: torch.Tensor
    image_logits: torch.Tensor
    static_maps: torch.Tensor
    dap_maps: torch.Tensor
    score_logit: torch.Tensor
    patch_features: list[torch.Tensor] | None = None

    @property
    def pred_score(self) -> torch.Tensor:
        """Image score s = ½ (p̂ + (2·max S_a + max Ŝ_a)/3) (B,)."""
        return self.score_logit

    @property
    def anomaly_map(self) -> torch.Tensor:
        """(S_a + Ŝ_a)/2 at input resolution, before smoothing (B, H, W)."""
        return (self.static_maps[:, 1] + self.dap_maps[:, 1]) / 2


class PriorNetwork(nn.Sequential):
    """Linear(M·E → M·E/16) → ReLU → Linear(→ T): maps selected patch features to a context shift Ω."""

    def __init__(self, in_features: int, out_features: int) -> None:
        hidden = in_features // 16
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class FAPromptModel(PromptedCLIP):
    """FAPrompt on a DPAM CLIP.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip tag, weights file, or ``None`` for random weights.
        image_size: Square input size.
        dpam_layers: Number of final vision blocks running the V-V path.
        n_ctx_normal: Length of the normal context, shared by all prompts.
        n_ctx_abnormal: Length of each abnormal context.
        n_abnormal_prompts: Number K of compound abnormal prompts.
        n_prior_patches: Number M of patches fed to the prior network.
        text_depth: Text blocks that see deep prompts.
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
        dpam_layers: int = 19,
        n_ctx_normal: int = 5,
        n_ctx_abnormal: int = 2,
        n_abnormal_prompts: int = 10,
        n_prior_patches: int = 10,
        text_depth: int = 9,
        text_n_ctx: int = 4,
        sigma: float = 10.0,
        temperature: float = 0.07,
        reference_weight: float = 0.5,
    ) -> None:
        geometry = backbone_geometry(backbone)
        image_size = geometry.check_image_size(image_size)
        n_ctx_normal = geometry.check_context("n_ctx_normal", n_ctx_normal, TEMPLATE_TOKENS + 1)
        n_ctx_abnormal = geometry.check_context(
            "n_ctx_abnormal", n_ctx_abnormal, TEMPLATE_TOKENS + n_ctx_normal, f"with n_ctx_normal={n_ctx_normal}"
        )
        n_abnormal_prompts = check_int("n_abnormal_prompts", n_abnormal_prompts)
        patches = (image_size // geometry.patch_size) ** 2
        n_prior_patches = check_int(
            "n_prior_patches", n_prior_patches, 1, patches, f"the patches at image_size={image_size}"
        )
        # feature_layers=None: patch features come from the last block only.
        super().__init__(
            backbone,
            pretrained,
            image_size,
            dpam_layers,
            text_depth,
            text_n_ctx,
            temperature,
            sigma=sigma,
            reference_weight=reference_weight,
        )
        self.n_prior_patches = n_prior_patches
        width = self.text.width
        normal_words = "X " * n_ctx_normal
        abnormal_words = "X " * n_ctx_abnormal
        self.normal_template = self.text.template(f"{normal_words}object.", n_ctx_normal)
        self.abnormal_template = self.text.template(
            f"{normal_words}{abnormal_words}damaged object.", n_ctx_normal + n_ctx_abnormal
        )
        self.normal_context = nn.Parameter(torch.randn(n_ctx_normal, width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(n_abnormal_prompts, n_ctx_abnormal, width) * 0.02)
        embed_dim = self.vision.visual.proj.shape[1]
        self.prior = PriorNetwork(n_prior_patches * embed_dim, width)

    prompt_dimensions: ClassVar[dict[str, tuple[str, ...]]] = {
        **PromptedCLIP.prompt_dimensions,
        "normal_context": ("n_ctx_normal", "text width of the backbone"),
        "abnormal_context": ("n_abnormal_prompts", "n_ctx_abnormal", "text width of the backbone"),
        "prior": ("prior width (n_prior_patches x embed dim / 16, or text width)", "n_prior_patches x embed dim"),
    }

    def convert_released_state_dict(self, prompt_learner: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the released ``prompt_learner`` (contexts, ``patch_meta_net``, deep prompts) to this model."""
        if "patch_meta_net.linear1.weight" not in prompt_learner:
            msg = "This is an AnomalyCLIP prompt checkpoint (no prior network); load it with AnomalyCLIP."
            raise ValueError(msg)
        state_dict = super().convert_released_state_dict(prompt_learner)
        width = prompt_learner["ctx_pos"].shape[-1]
        state_dict["normal_context"] = prompt_learner["ctx_pos"].reshape(-1, width)
        state_dict["abnormal_context"] = prompt_learner["ctx_neg"].reshape(-1, *prompt_learner["ctx_neg"].shape[-2:])
        for released, own in (("linear1", "0"), ("linear2", "2")):
            for kind in ("weight", "bias"):
                state_dict[f"prior.{own}.{kind}"] = prompt_learner[f"patch_meta_net.{released}.{kind}"]
        return state_dict

    def _abnormal_contexts(self, abnormal_context: torch.Tensor) -> torch.Tensor:
        """Full contexts [N, Aᵏ] of the abnormal prompts for abnormal contexts (..., K, n_ctx_abnormal, T)."""
        normal_context = self.normal_context.expand(*abnormal_context.shape[:-2], *self.normal_context.shape)
        return torch.cat([normal_context, abnormal_context], dim=-2)

    def encode_static_text(self) -> StaticText:
        """Normal and compound abnormal text features (CAP), in one encoder call."""
        normal, abnormal_each = self.encode_prompts(
            (self.normal_template, self.normal_context),
            (self.abnormal_template, self._abnormal_contexts(self.abnormal_context)),
        )
        normal = normal[None]
        pair = F.normalize(torch.cat([normal, abnormal_each.mean(dim=0, keepdim=True)]), dim=-1)
        return StaticText(normal, abnormal_each, pair)

    def score_features(
        self,
        image_size: tuple[int, int],
        text: StaticText,
        image_features: torch.Tensor,
        patch_features: list[torch.Tensor],
    ) -> FAPromptOutput:
        """CAP's static map, DAP's per-image prompts from the top-M patches, and the fused score."""
        static_text = text
        (patch_features,) = patch_features

        static_probabilities = patch_similarity(patch_features, static_text.pair, self.temperature)
        top = static_probabilities[..., 1].topk(self.n_prior_patches, dim=1).indices
        selected = torch.gather(patch_features, 1, top[..., None].expand(-1, -1, patch_features.shape[-1]))
        with torch.autocast(patch_features.device.type, enabled=False):
            prior = self.prior(selected.flatten(1))

        # DAP: Ω shifts every abnormal context vector; B × K prompts in one encoder call.
        dap_context = self.abnormal_context[None] + prior[:, None, None, :]
        (dap_abnormal,) = self.encode_prompts((self.abnormal_template, self._abnormal_contexts(dap_context)))
        dap_abnormal = dap_abnormal.mean(dim=1)
        normal = static_text.normal.expand(dap_abnormal.shape[0], -1)
        dap_text = F.normalize(torch.stack([normal, dap_abnormal], dim=1), dim=-1)
        dap_probabilities = patch_similarity(patch_features, dap_text, self.temperature)

        image_logits = similarity_logits(image_features, dap_text, self.temperature)
        patch_maximum = (2 * static_probabilities[..., 1].amax(dim=1) + dap_probabilities[..., 1].amax(dim=1)) / 3
        score = (image_logits.softmax(dim=-1)[:, 1] + patch_maximum) / 2

        size = image_size
        return FAPromptOutput(
            static_text=static_text,
            dap_text=dap_text,
            selected_patches=selected,
            prior=prior,
            image_logits=image_logits,
            static_maps=upsample_maps(static_probabilities, size),
            dap_maps=upsample_maps(dap_probabilities, size),
            score_logit=score,
        )
