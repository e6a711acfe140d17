"""Base of the zero-shot prompt methods: DPAM vision path, deep text prompts, prompts learned on auxiliary data.

AnomalyCLIP and FAPrompt share this family: a frozen CLIP whose last ``dpam_layers`` vision blocks run DPAM's V-V
attention, deep text prompts in the first ``text_depth`` text blocks, prompts learned once with Adam on labelled
anomalous images with masks of other categories (:class:`~.training_rules.MaskSupervisedPromptLearning`), then
applied unchanged to unseen ones, optionally fused with a visual memory of ``k_shot`` normal references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from anomalib_faprompt.clip.settings import check_betas, check_float
from anomalib_faprompt.methods import Learning
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.models.training_rules import MaskSupervisedPromptLearning, TrainingRule


class ZeroShotPromptMethod(PromptMethod):
    """A DPAM prompt method learned on auxiliary data (see the module docstring).

    Args:
        dpam_layers: Number of final vision blocks running DPAM's V-V path.
        text_depth: Text blocks that see learnable tokens (deep prompts before blocks 2..depth).
        text_n_ctx: Length of each deep text prompt.
        reference_weight: Weight ``w`` of the visual memory of ``k_shot`` references: map = (1 - w) · prompt map
            + w · visual map, score likewise (see ``PromptedCLIP.forward``); the references' features are those of
            the feature layers the prompts read, so no extra forward pass runs per test image.
        learning_rate: Adam learning rate.
        betas: Adam betas.
        kwargs: The settings every prompt method takes (:class:`~anomalib_faprompt.models.base.PromptMethod`).
    """

    learning_types: ClassVar[tuple[Learning, ...]] = (Learning.ZERO_SHOT, Learning.AUXILIARY)
    training_rule: ClassVar[TrainingRule] = MaskSupervisedPromptLearning()
    prompt_setting_names: ClassVar[tuple[str, ...]] = (
        *PromptMethod.prompt_setting_names,
        "dpam_layers",
        "text_depth",
        "text_n_ctx",
    )

    def __init__(
        self,
        dpam_layers: int = 19,
        text_depth: int = 9,
        text_n_ctx: int = 4,
        reference_weight: float = 0.5,
        learning_rate: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        **kwargs: Any,
    ) -> None:
        learning_rate = check_float("learning_rate", learning_rate, low_open=True, why="Adam's step size")
        betas = check_betas(betas)
        super().__init__(**kwargs)
        self.learning_rate = learning_rate
        self.betas = betas

    def clip_arguments(self) -> dict[str, Any]:
        """The arguments of this family's torch models that come from the shared settings, from ``hparams``."""
        names = ("backbone", "pretrained", "image_size", "dpam_layers", "text_depth", "text_n_ctx", "reference_weight")
        return {name: self.hparams[name] for name in names}
