"""AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection (ICLR 2024).

Learns one normal and one abnormal text prompt, independent of the object class, on an
auxiliary labelled dataset; a frozen CLIP with DPAM's V-V attention then scores images and
segments anomalies on unseen datasets.

Paper: https://arxiv.org/abs/2310.18961

Example:
    >>> from anomalib_faprompt import AnomalyCLIP
    >>> model = AnomalyCLIP(backbone="ViT-B-16", pretrained=None, image_size=224,
    ...                     feature_layers=(6, 12), dpam_layers=10)
    >>> model.learning_type.value
    'one_class'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_faprompt.models.prompt_module import PromptLearningMixin

from .loss import AnomalyCLIPLoss
from .torch_model import AnomalyCLIPModel

__all__ = ["AnomalyCLIP"]


class AnomalyCLIP(PromptLearningMixin, AnomalibModule):
    """AnomalyCLIP Lightning module.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip pretrained tag, path to a weights file (OpenAI JIT archive or state
            dict), or ``None`` for random weights.
        image_size: Square input size; the pre-processor resizes to it.
        feature_layers: 1-indexed vision blocks whose patch features make the maps. The paper uses
            (6, 12, 18, 24); the released checkpoints effectively used (24,) (see the README).
        dpam_layers: Number of final vision blocks running DPAM's V-V path.
        n_ctx: Length of the learnable normal and abnormal contexts.
        text_depth: Text blocks that see learnable tokens.
        text_n_ctx: Length of each deep text prompt.
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        prompt_weights: Learned prompts to load (released ``{"prompt_learner": ...}`` checkpoints,
            files from ``save_prompt_weights`` or Lightning checkpoints). With it the model is zero-shot.
        learning_rate: Adam learning rate.
        betas: Adam betas.
        allow_untrained_prompts: Allow testing/predicting with untrained prompts (experiments only).
        max_epochs: Epochs of prompt learning. ``None`` leaves it to the trainer (15 in ``configs/``); when
            set it overrides the trainer's value, for runners that take no trainer config (``anomalib benchmark``).
        pre_processor: Pre-processor, or ``True`` for the default (bicubic resize, CLIP normalisation).
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for image AUROC/F1, pixel AUROC and AUPRO.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    method_name = "AnomalyCLIP"

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 518,
        feature_layers: Sequence[int] = (6, 12, 18, 24),
        dpam_layers: int = 19,
        n_ctx: int = 12,
        text_depth: int = 9,
        text_n_ctx: int = 4,
        sigma: float = 4.0,
        prompt_weights: str | Path | None = None,
        learning_rate: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        allow_untrained_prompts: bool = False,
        max_epochs: int | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = AnomalyCLIPModel(
            backbone=backbone,
            pretrained=pretrained,
            image_size=image_size,
            feature_layers=feature_layers,
            dpam_layers=dpam_layers,
            n_ctx=n_ctx,
            text_depth=text_depth,
            text_n_ctx=text_n_ctx,
            sigma=sigma,
        )
        self.loss = AnomalyCLIPLoss()
        self.learning_rate = learning_rate
        self.betas = betas
        self._init_prompts(prompt_weights, allow_untrained_prompts, max_epochs)

    def training_losses(
        self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one prompt-learning step (``loss`` is the total)."""
        output = self.model.forward_features(images)
        return self.loss(output.layer_maps, output.image_logits, masks, labels)
