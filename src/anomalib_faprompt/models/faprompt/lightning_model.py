"""FAPrompt: Fine-grained Abnormality Prompt Learning for Zero-shot Anomaly Detection (ICCV 2025).

Compound abnormality prompts (CAP) learn K fine-grained abnormal prompts that share a normal
context; data-dependent abnormality prompts (DAP) adapt them per image from its most abnormal
patches through a small prior network. Prompts learn once on an auxiliary labelled dataset.

Paper: https://arxiv.org/abs/2410.10289

Example:
    >>> from anomalib_faprompt import FAPrompt
    >>> model = FAPrompt(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10)
    >>> model.model.abnormal_context.shape
    torch.Size([10, 2, 512])
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from anomalib.models.components import AnomalibModule

from anomalib_faprompt.compat import attached_trainer
from anomalib_faprompt.models.zero_shot_method import ZeroShotPromptMethod

from .loss import FAPromptLoss
from .torch_model import FAPromptModel

__all__ = ["FAPrompt"]


class FAPrompt(ZeroShotPromptMethod, AnomalibModule):
    """FAPrompt Lightning module.

    Args:
        n_ctx_normal: Length of the normal context shared by all prompts.
        n_ctx_abnormal: Length of each compound abnormal context.
        n_abnormal_prompts: Number K of compound abnormal prompts.
        n_prior_patches: Number M of most abnormal patches fed to the prior network (DAP).
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        kwargs: The settings of the DPAM prompt methods (``dpam_layers``, ``text_depth``, ``learning_rate``, ...:
            :class:`~anomalib_faprompt.models.zero_shot_method.ZeroShotPromptMethod`) and of every prompt method
            (``backbone``, ``pretrained``, ``image_size``, ``prompt_weights``, ``k_shot``, ...:
            :class:`~anomalib_faprompt.models.base.PromptMethod`).

    Raises:
        ValueError: If a setting is out of range (for the backbone), before any CLIP weights load.
    """

    method_name = "FAPrompt"
    prompt_setting_names: ClassVar[tuple[str, ...]] = (
        *ZeroShotPromptMethod.prompt_setting_names,
        "n_ctx_normal",
        "n_ctx_abnormal",
        "n_abnormal_prompts",
        "n_prior_patches",
    )

    def __init__(
        self,
        n_ctx_normal: int = 5,
        n_ctx_abnormal: int = 2,
        n_abnormal_prompts: int = 10,
        n_prior_patches: int = 10,
        sigma: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.loss = FAPromptLoss()

    def build_model(self) -> FAPromptModel:
        """The torch model of the settings in ``hparams``."""
        names = ("n_ctx_normal", "n_ctx_abnormal", "n_abnormal_prompts", "n_prior_patches", "sigma")
        return FAPromptModel(**self.clip_arguments(), **{name: self.hparams[name] for name in names})

    def training_losses(
        self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one prompt-learning step (``loss`` is the total) on this process's part of the batch."""
        output = self.model.forward_features(images)
        trainer = attached_trainer(self)
        shards = trainer.world_size if trainer is not None else 1
        return self.loss(
            output.static_maps,
            output.dap_maps,
            output.image_logits,
            output.score_logit,
            output.static_text.abnormal_each,
            output.prior,
            masks,
            labels,
            shards=shards,
        )
