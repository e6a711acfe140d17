"""AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection (ICLR 2024).

Learns one normal and one abnormal text prompt, independent of the object class, on an
auxiliary labelled dataset; a frozen CLIP with DPAM's V-V attention then scores images and
segments anomalies on unseen datasets.

Paper: https://arxiv.org/abs/2310.18961

Example:
    >>> from anomalib_faprompt import AnomalyCLIP
    >>> model = AnomalyCLIP(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10)
    >>> model.model.feature_layers  # the released method: the last of ViT-B/16's 12 blocks
    (12,)
    >>> model.learning_type.value
    'one_class'

    The paper's four-layer variant (ViT-L/14, 24 blocks) is one setting away:

    >>> model = AnomalyCLIP(feature_layers=[6, 12, 18, 24])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from anomalib.models.components import AnomalibModule

from anomalib_faprompt.models.zero_shot_method import ZeroShotPromptMethod

from .loss import AnomalyCLIPLoss
from .torch_model import AnomalyCLIPModel

__all__ = ["AnomalyCLIP"]


class AnomalyCLIP(ZeroShotPromptMethod, AnomalibModule):
    """AnomalyCLIP Lightning module.

    Args:
        feature_layers: 1-indexed vision blocks whose patch features make the maps (one map per block,
            summed). ``None``, the default, is the backbone's last block (24 for ViT-L/14): the method as
            released, with which the authors produced every reported result and their checkpoints.
            ``[6, 12, 18, 24]`` is the four-layer variant of the paper's early versions (see the README).
            The resolved blocks are recorded in ``hparams``, checkpoints and prompt files.
        n_ctx: Length of the learnable normal and abnormal contexts.
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        kwargs: The settings of the DPAM prompt methods (``dpam_layers``, ``text_depth``, ``learning_rate``, ...:
            :class:`~anomalib_faprompt.models.zero_shot_method.ZeroShotPromptMethod`) and of every prompt method
            (``backbone``, ``pretrained``, ``image_size``, ``prompt_weights``, ``k_shot``, ...:
            :class:`~anomalib_faprompt.models.base.PromptMethod`).

    Raises:
        ValueError: If a setting is out of range (for the backbone), before any CLIP weights load.
    """

    method_name = "AnomalyCLIP"
    prompt_setting_names: ClassVar[tuple[str, ...]] = (
        *ZeroShotPromptMethod.prompt_setting_names,
        "feature_layers",
        "n_ctx",
    )

    def __init__(
        self,
        feature_layers: Sequence[int] | None = None,
        n_ctx: int = 12,
        sigma: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.loss = AnomalyCLIPLoss()

    def build_model(self) -> AnomalyCLIPModel:
        """The torch model of the settings in ``hparams``; ``feature_layers`` recorded as resolved (None: the last)."""
        settings = self.hparams
        model = AnomalyCLIPModel(**self.clip_arguments(), feature_layers=settings["feature_layers"],
                                 n_ctx=settings["n_ctx"], sigma=settings["sigma"])  # fmt: skip
        settings["feature_layers"] = list(model.feature_layers)
        return model

    def training_losses(
        self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one prompt-learning step (``loss`` is the total)."""
        output = self.model.forward_features(images)
        return self.loss(output.layer_maps, output.image_logits, masks, labels)
