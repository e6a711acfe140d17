"""PyTorch model of PromptAD: prompts learned from normal images, fused with a visual memory (README).

The vision side is VV-CLIP, the shared DPAM dual path on every block (README: Method); the image feature is
CLIP's own embedding (``ln_post`` then ``proj``), the patch features the V-V path's last block, and the visual
memory holds the original path's residual after attention of two blocks (the 4th and 9th of 12, §3.1). The text
side has two heads, each the prompts of one of the release's two separately trained models (§7.1): the *image*
head (``n_pro`` 3, learned on the CLS feature) gives the textual image score, the *pixel* head (``n_pro`` 1,
learned on the patch features) the textual map. Prompts per head (§4.3):

- normal: ``[SOS][N_1..N_n_ctx] {object}.`` once per normal context (``n_pro``);
- manual anomaly: the normal contexts before each manual state (``damaged {object}``, ...), state-major;
- learnable anomaly: ``[SOS][N_1..N_n_ctx][A_1..A_n_ctx_ab] {object}.``, row ``i`` pairing normal context
  ``i mod n_pro`` with anomaly context ``i mod n_pro_ab``.

Example:
    >>> import torch
    >>> from anomalib_faprompt.models.promptad.torch_model import PromptADModel
    >>> model = PromptADModel(backbone="ViT-B-16", pretrained=None, image_size=224, category="bottle").eval()
    >>> model.add_references(torch.randn(2, 3, 224, 224))   # k = 2 normal images
    >>> output = model(torch.randn(3, 3, 224, 224))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([3]), torch.Size([3, 224, 224]))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.clip.settings import backbone_geometry, check_float, check_int, check_layers
from anomalib_faprompt.clip.text import PromptedTextEncoder, PromptTemplate
from anomalib_faprompt.components import GaussianSmoothing
from anomalib_faprompt.components.pre_processing import CLIP_MEAN, CLIP_STD

from .prompting import has_category_states, manual_states, object_name

logger = logging.getLogger(__name__)

#: The release smooths its maps with σ = 4 at its 400-px evaluation size (README: Method).
RELEASE_SIGMA, RELEASE_MAP_SIZE = 4.0, 400


@dataclass
class HeadText:
    """One head's text features: un-normalised encoder outputs and the two prototypes.

    Attributes:
        normal: Normal prompts' features (n_pro, E); the three are ``None`` for a released inference checkpoint's
            prototypes.
        manual: Manual anomaly prompts' features (states × n_pro, E).
        learned: Learnable anomaly prompts' features (n_pro_ab × n_pro, E).
        prototypes: L2-normalised (normal, anomaly) prototypes (2, E): the normalised means (§5).
    """

    normal: torch.Tensor | None
    manual: torch.Tensor | None
    learned: torch.Tensor | None
    prototypes: torch.Tensor

    @property
    def anomaly_prompts(self) -> torch.Tensor:
        """Every anomaly prompt's feature, manual then learned, L2-normalised (K_a, E)."""
        if self.manual is None or self.learned is None:
            msg = "These text features are a released inference checkpoint's prototypes: they have no prompts."
            raise RuntimeError(msg)
        return F.normalize(torch.cat([self.manual, self.learned]), dim=-1)


@dataclass
class PromptADFeatures:
    """L2-normalised image features: CLS (B, E), V-V patches (B, N, E), memory layers (layers, B, N, width)."""

    image: torch.Tensor
    patches: torch.Tensor
    memory: torch.Tensor


@dataclass
class HeadScores:
    """Everything one head scores (README: Method), at the model's ``map_size``.

    Attributes:
        textual_score: Anomaly probability of the CLS feature (B,).
        textual_map: Anomaly probability per patch (B, side, side).
        visual_map: Mean over memory layers of the nearest-neighbour distance per patch (B, side, side).
        fused_grid: Half the harmonic mean of the textual and visual maps (B, side, side).
        fused_map: ``fused_grid`` upsampled (B, H, W); ``smoothed_map`` after the Gaussian (the anomaly map).
        visual_map_upsampled: ``visual_map`` upsampled (B, H, W).
        image_score: Half the harmonic mean of the upsampled visual map's maximum and the textual score (B,).
    """

    textual_score: torch.Tensor
    textual_map: torch.Tensor
    visual_map: torch.Tensor
    fused_grid: torch.Tensor
    fused_map: torch.Tensor
    smoothed_map: torch.Tensor
    visual_map_upsampled: torch.Tensor
    image_score: torch.Tensor


@dataclass
class PromptADOutput:
    """Training-mode output: the text of both heads and the image features (what the loss needs)."""

    text: dict[str, HeadText]
    features: PromptADFeatures


def half_harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 / (1/a + 1/b)``, the release's fusion (half the harmonic mean; 0 where either is 0)."""
    return 1.0 / (1.0 / a + 1.0 / b)


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class PromptHead(nn.Module):
    """One head's learnable contexts and its three prompt templates (built once the object name is known).

    Args:
        width: Text token width of the backbone.
        n_pro: Number of normal contexts (learnable normal prompts).
        n_ctx: Tokens per normal context.
        n_pro_ab: Number of learnable anomaly contexts.
        n_ctx_ab: Tokens per anomaly context.
    """

    def __init__(self, width: int, n_pro: int, n_ctx: int, n_pro_ab: int, n_ctx_ab: int) -> None:
        super().__init__()
        self.normal_context = nn.Parameter(torch.randn(n_pro, n_ctx, width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(n_pro_ab, n_ctx_ab, width) * 0.02)
        self.templates: nn.ModuleDict | None = None
        #: The prompt texts of each template (placeholders ``N`` and ``A`` where the contexts go).
        self.texts: dict[str, list[str]] = {}
        self.n_states = 0

    def build_templates(self, text: PromptedTextEncoder, name: str, states: Sequence[str]) -> None:
        """Tokenise the normal, manual-anomaly and learnable-anomaly templates for the object ``name``."""
        n_pro, n_ctx = self.normal_context.shape[:2]
        n_ctx_ab = self.abnormal_context.shape[1]
        normal = " ".join(["N"] * n_ctx)
        abnormal = " ".join(["A"] * n_ctx_ab)
        self.texts = {
            "normal": [f"{normal} {name}."] * n_pro,
            "manual": [f"{normal} {state.format(name)}." for state in states for _ in range(n_pro)],
            "learned": [f"{normal} {abnormal} {name}."] * (n_pro * self.abnormal_context.shape[0]),
        }
        self.templates = nn.ModuleDict(
            {
                "normal": text.template(self.texts["normal"][0], n_ctx),
                "manual": text.template(self.texts["manual"], n_ctx),
                "learned": text.template(self.texts["learned"][0], n_ctx + n_ctx_ab),
            }
        ).to(self.normal_context.device)
        self.n_states = len(states)

    def prompt_groups(self) -> list[tuple[PromptTemplate, torch.Tensor]]:
        """(template, contexts) of the normal, manual and learnable anomaly prompts, in the release's row order."""
        if self.templates is None:
            msg = "PromptAD's prompts have no object name yet: set the category first (PromptADModel.set_category)."
            raise RuntimeError(msg)
        n_pro, n_pro_ab = self.normal_context.shape[0], self.abnormal_context.shape[0]
        # Row i of the manual prompts uses normal context i mod n_pro (state-major); of the learnable anomaly
        # prompts, normal context i mod n_pro and anomaly context i mod n_pro_ab (README: Method).
        manual_contexts = self.normal_context.repeat(self.n_states, 1, 1)
        learned_contexts = torch.cat(
            [self.normal_context.repeat(n_pro_ab, 1, 1), self.abnormal_context.repeat(n_pro, 1, 1)], dim=1
        )
        return [
            (self.templates["normal"], self.normal_context),
            (self.templates["manual"], manual_contexts),
            (self.templates["learned"], learned_contexts),
        ]


class PromptADModel(PromptedCLIP):
    """PromptAD: normal and anomaly prompts of two heads on VV-CLIP, and a visual memory of k normal images.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip tag, weights file, or ``None`` for random weights.
        image_size: Square input size.
        category: Category whose object name and manual anomaly states the prompts use; ``None`` until
            :meth:`set_category` is called (the Lightning model takes it from the datamodule).
        n_ctx: Tokens per normal context.
        n_ctx_ab: Tokens per learnable anomaly context.
        n_pro_ab: Number of learnable anomaly contexts.
        n_pro_image: Normal contexts of the image head (the release's image-level model).
        n_pro_pixel: Normal contexts of the pixel head (the release's pixel-level model).
        memory_layers: 1-indexed vision blocks whose residual after attention forms the visual memory.
        map_size: Side of the anomaly map and of the upsampled visual map whose maximum scores the image;
            ``None`` is ``image_size``.
        sigma: Gaussian smoothing of the anomaly map in pixels; ``None`` is the release's σ = 4 at its 400-px
            evaluation size, scaled to ``map_size`` (2.4 at 240 px).
        bgr_test_images: Score images with red and blue swapped, as the release feeds its test images (§2).

    Raises:
        ValueError: If a setting is out of range (for the backbone); raised before any weights load.
    """

    global_ln_post = True
    #: Scores and maps are half harmonic means of values in [0, 1]: they lie in [0, ½].
    output_scale: ClassVar[float] = 0.5
    #: The text prototypes of a released inference checkpoint (:meth:`load_released`), when one was loaded: they
    #: replace the prompts' (a checkpoint of the release holds no prompts, only these and the galleries).
    learned_buffers: ClassVar[tuple[str, ...]] = ("released_prototypes",)

    def __init__(
        self,
        backbone: str | Path = "ViT-B-16-plus-240",
        pretrained: str | Path | None = "laion400m_e32",
        image_size: int = 240,
        category: str | None = None,
        n_ctx: int = 4,
        n_ctx_ab: int = 1,
        n_pro_ab: int = 4,
        n_pro_image: int = 3,
        n_pro_pixel: int = 1,
        memory_layers: Sequence[int] = (4, 9),
        map_size: int | None = None,
        sigma: float | None = None,
        bgr_test_images: bool = False,
    ) -> None:
        geometry = backbone_geometry(backbone)
        n_ctx = geometry.check_context("n_ctx", n_ctx, 0, "with n_ctx_ab and the object's words")
        n_ctx_ab = geometry.check_context("n_ctx_ab", n_ctx_ab, n_ctx, "with n_ctx and the object's words")
        n_pro_ab = check_int("n_pro_ab", n_pro_ab, 1, why="learnable anomaly contexts")
        n_pro_image = check_int("n_pro_image", n_pro_image, 1, why="normal contexts of the image head")
        n_pro_pixel = check_int("n_pro_pixel", n_pro_pixel, 1, why="normal contexts of the pixel head")
        memory_layers = check_layers("memory_layers", memory_layers, geometry.vision_depth)
        map_size = image_size if map_size is None else check_int("map_size", map_size, 1, why="anomaly map side")
        if sigma is None:
            sigma = RELEASE_SIGMA * map_size / RELEASE_MAP_SIZE
        sigma = check_float("sigma", sigma, why="in pixels of the anomaly map; 0 disables smoothing")
        super().__init__(
            backbone,
            pretrained,
            image_size,
            dpam_layers=geometry.vision_depth,  # VV-CLIP: the dual path on every block
            text_depth=1,  # no deep prompts
            text_n_ctx=1,
            feature_layers=None,  # the V-V path of the last block
            sigma=0.0,
        )
        self.smoothing = GaussianSmoothing(sigma, max_size=map_size)
        self.memory_layers = memory_layers
        self.map_size = map_size
        self.bgr_test_images = bool(bgr_test_images)
        width = self.text.width
        self.heads = nn.ModuleDict(
            {
                "image": PromptHead(width, n_pro_image, n_ctx, n_pro_ab, n_ctx_ab),
                "pixel": PromptHead(width, n_pro_pixel, n_ctx, n_pro_ab, n_ctx_ab),
            }
        )
        self.register_buffer("released_prototypes", torch.empty(0))
        self.category: str | None = None
        if category is not None:
            self.set_category(category)

    prompt_dimensions: ClassVar[dict[str, tuple[str, ...]]] = {
        "heads.image.normal_context": ("n_pro_image", "n_ctx", "text width of the backbone"),
        "heads.pixel.normal_context": ("n_pro_pixel", "n_ctx", "text width of the backbone"),
        "heads.image.abnormal_context": ("n_pro_ab", "n_ctx_ab", "text width of the backbone"),
        "heads.pixel.abnormal_context": ("n_pro_ab", "n_ctx_ab", "text width of the backbone"),
    }

    def set_category(self, category: str) -> None:
        """Build the prompts of ``category``: its object name and manual anomaly states (README: Method).

        A category without manual states of its own (any outside MVTec AD and VisA) gets the eight generic ones.
        """
        if category == self.category:
            return
        name, states = object_name(category), manual_states(category)
        if not has_category_states(category):
            logger.info(
                "PromptAD: no manual anomaly states for category '%s'; using the %d generic states with object "
                "name '%s'.",
                category,
                len(states),
                name,
            )
        for head in self.heads.values():
            head.build_templates(self.text, name, states)
        self.category = category
        self.forget_text_features()

    # Text ---------------------------------------------------------------------------------------------------

    def encode_static_text(self) -> dict[str, HeadText]:
        """Both heads' prompts in one text-encoder call; their features and prototypes (§5).

        With a released inference checkpoint loaded, its prototypes (and no prompt features).
        """
        if self.released_prototypes.numel():
            return {name: HeadText(None, None, None, self.released_prototypes[i]) for i, name in enumerate(self.heads)}
        groups = [group for head in self.heads.values() for group in head.prompt_groups()]
        features = self.encode_prompts(*groups)
        text = {}
        for index, name in enumerate(self.heads):
            normal, manual, learned = features[3 * index : 3 * index + 3]
            # Means of the un-normalised features, then L2 (the release's 'V1' gallery).
            prototypes = torch.stack([normal.mean(dim=0), torch.cat([manual, learned]).mean(dim=0)])
            text[name] = HeadText(normal, manual, learned, F.normalize(prototypes, dim=-1))
        return text

    # Images -------------------------------------------------------------------------------------------------

    def encode_features(self, images: torch.Tensor) -> PromptADFeatures:
        """Frozen VV-CLIP forward without gradients; every feature L2-normalised, class token dropped."""
        with torch.no_grad():
            features = self.run_vision(images, self.feature_layers, self.memory_layers)
        return PromptADFeatures(
            image=F.normalize(features.image_features.float(), dim=-1),
            patches=F.normalize(features.patch_features[0][:, 1:].float(), dim=-1),
            memory=torch.stack([F.normalize(f[:, 1:].float(), dim=-1) for f in features.residual_features]),
        )

    @torch.no_grad()
    def add_references(self, images: torch.Tensor) -> None:
        """Add k normal images (pre-processed, (k, 3, H, W)) to the visual memory: their memory-layer patches."""
        images = self.check_input(images)
        self.references.add(self.encode_features(images).memory)

    def swap_red_blue(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images with red and blue swapped before normalisation (the release's BGR test input)."""
        mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((images * std + mean).flip(1) - mean) / std

    # Scoring ------------------------------------------------------------------------------------------------

    def visual_map(self, features: PromptADFeatures) -> torch.Tensor:
        """Mean over the memory layers of each patch's distance to the nearest reference patch (B, N)."""
        if self.references.is_empty:
            msg = (
                "PromptAD has no visual memory: it scores against k normal reference images (k_shot >= 1). Fit it "
                "on a datamodule with normal training images, or load a checkpoint or prompt file that holds one."
            )
            raise RuntimeError(msg)
        return self.references(features.memory).mean(dim=0)

    def textual_probabilities(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Anomaly probability of features (..., E) against (normal, anomaly) prototypes; raw ``logit_scale``.

        The release multiplies cosines by CLIP's stored ``logit_scale`` (≈ 4.6 for LAION weights), not by its
        exponential (100) as CLIP's own forward does (README: Method): a temperature of about 0.22.
        """
        with torch.autocast(features.device.type, enabled=False):
            logits = self.logit_scale * features.float() @ prototypes.float().t()
        return logits.softmax(dim=-1)[..., 1]

    def head_scores(self, head: str, text: dict[str, HeadText], features: PromptADFeatures) -> HeadScores:
        """Every score and map of one head's prototypes (the release's scoring of that head's model, §8)."""
        prototypes = text[head].prototypes
        side = round(features.patches.shape[1] ** 0.5)
        size = (self.map_size, self.map_size)
        textual_score = self.textual_probabilities(features.image, prototypes)
        textual_map = self.textual_probabilities(features.patches, prototypes).unflatten(1, (side, side))
        visual_map = self.visual_map(features).unflatten(1, (side, side))
        fused_grid = half_harmonic_mean(textual_map, visual_map)
        fused_map = _upsample(fused_grid, size)
        visual_map_upsampled = _upsample(visual_map, size)
        image_score = half_harmonic_mean(visual_map_upsampled.flatten(1).amax(dim=1), textual_score)
        return HeadScores(
            textual_score,
            textual_map,
            visual_map,
            fused_grid,
            fused_map,
            self.smoothing(fused_map),
            visual_map_upsampled,
            image_score,
        )

    def forward_features(self, images: torch.Tensor) -> PromptADOutput:
        """Check the input; both heads' text (cached) and the image features."""
        images = self.check_input(images)
        text = self.cached(self.encode_static_text)
        return PromptADOutput(text=text, features=self.encode_features(images))

    def forward(self, images: torch.Tensor) -> InferenceBatch | PromptADOutput:
        """Score images: the image head's score and the pixel head's smoothed map in eval mode (§8).

        ``pred_score = 1 / (1/max(up(V)) + 1/p_t)`` with ``p_t`` the image head's textual CLS score and ``V`` the
        visual map; ``anomaly_map = smooth(up(1 / (1/P_t + 1/V)))`` with ``P_t`` the pixel head's textual map.
        """
        if self.training:
            return self.forward_features(images)
        images = self.check_input(images)
        if self.bgr_test_images:
            images = self.swap_red_blue(images)
        output = self.forward_features(images)
        features, text = output.features, output.text
        side = round(features.patches.shape[1] ** 0.5)
        size = (self.map_size, self.map_size)
        visual_map = self.visual_map(features).unflatten(1, (side, side))
        textual_score = self.textual_probabilities(features.image, text["image"].prototypes)
        pred_score = half_harmonic_mean(_upsample(visual_map, size).flatten(1).amax(dim=1), textual_score)
        textual_map = self.textual_probabilities(features.patches, text["pixel"].prototypes).unflatten(1, (side, side))
        anomaly_map = self.smoothing(_upsample(half_harmonic_mean(textual_map, visual_map), size))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    # The release's files ----------------------------------------------------------------------------------------

    def load_released(self, image: dict[str, torch.Tensor], pixel: dict[str, torch.Tensor], source: str = "") -> None:
        """Load the release's two models (its image-level ``CLS-…`` and pixel-level ``SEG-…`` runs) into the heads.

        See :func:`~anomalib_faprompt.models.promptad.released.load_released`.
        """
        from .released import load_released

        load_released(self, image, pixel, source)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Released prototypes exist only when a release's inference checkpoint was loaded: take the saved shape.
        key = prefix + "released_prototypes"
        if key in state_dict:
            self.released_prototypes = torch.empty_like(state_dict[key], device=self.released_prototypes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
