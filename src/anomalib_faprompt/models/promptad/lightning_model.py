"""PromptAD: Learning Prompts with only Normal Samples for Few-Shot Anomaly Detection (CVPR 2024).

Learns normal prompts and anomaly prompts (the normal ones with manual anomaly states, and with learnable
anomaly tokens) from k normal images of the category only, under a contrastive and an explicit anomaly margin
loss, and fuses their textual anomaly map and score with a visual memory of the same k images.

Paper: https://arxiv.org/abs/2404.05231

Example:
    >>> from anomalib_faprompt import PromptAD
    >>> model = PromptAD(backbone="ViT-B-16", pretrained=None, image_size=224, category="bottle", k_shot=2)
    >>> model.learning_type.value  # fitting learns the prompts from 2 normal images of the train split
    'one_class'
    >>> model.trainer_arguments["max_epochs"], model.trainer_arguments["limit_train_batches"]
    (100, 1)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib.models.components import AnomalibModule

from anomalib_faprompt.clip.settings import check_float
from anomalib_faprompt.compat import attached_trainer
from anomalib_faprompt.methods import Learning
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.models.training_rules import NormalFewShotPromptLearning, TrainingRule

from .loss import PromptADLoss
from .torch_model import PromptADFeatures, PromptADModel

__all__ = ["PromptAD"]

logger = logging.getLogger(__name__)


class PromptAD(PromptMethod, AnomalibModule):
    """PromptAD Lightning module: one fit learns both of the release's heads from ``k_shot`` normal images.

    Defaults are the release's (README): ViT-B-16-plus-240 with LAION-400M weights at 240 px, 4 normal
    context tokens, 1 token in each of 4 learnable anomaly contexts, 3 normal contexts for the image score and
    1 for the map, SGD (lr 0.002, momentum 0.9, weight decay 5e-4) with a cosine schedule to 1e-5 over 100
    epochs of one step on all k shots, λ = 0.001, margin 0. Deviations from the release, each documented in the
    README: RGB test images (``bgr_test_images=True`` feeds them as the release does), the last epoch's prompts
    (the release keeps the epoch that scored best on the test set), fp32 (the release forces fp16 parameters;
    Lightning's ``precision`` gives autocast).

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config (the release's by default).
        pretrained: open_clip pretrained tag, weights file, or ``None`` for random weights.
        image_size: Square input size; the pre-processor resizes to it.
        category: The category whose object name and manual anomaly states the prompts use (``metal_nut`` ->
            "metal nut"); ``None`` takes the datamodule's ``category`` when fitting (or the loaded prompts').
            Categories outside MVTec AD and VisA get the eight generic anomaly states (logged).
        k_shot: Normal images the prompts learn from and the visual memory holds (at least 1).
        n_ctx: Tokens of each normal context.
        n_ctx_ab: Tokens of each learnable anomaly context.
        n_pro_ab: Number of learnable anomaly contexts.
        n_pro_image: Normal contexts of the image head (the release's image-level model, ``n_pro`` 3).
        n_pro_pixel: Normal contexts of the pixel head (the release's pixel-level model, ``n_pro`` 1).
        memory_layers: 1-indexed vision blocks whose residual after attention forms the visual memory (the
            release's hooks on blocks 2 and 7 read blocks 3 and 8's, 0-indexed: ``(4, 9)``).
        map_size: Side of the anomaly map; ``None`` is ``image_size`` (anomalib compares maps with masks resized
            to the input size).
        sigma: Gaussian smoothing of the map in pixels; ``None`` is the release's σ = 4 at 400 px scaled to
            ``map_size``.
        bgr_test_images: Score validation, test and predicted images with red and blue swapped, as the release
            does (it trains on RGB): only to reproduce its published numbers.
        lambda_align: Weight of the alignment loss of manual and learnable anomaly prompts (``lambda1``).
        margin: Margin of the explicit anomaly margin loss.
        learning_rate: SGD learning rate at the first epoch.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        min_learning_rate: Learning rate the cosine schedule ends at (``eta_min``).
        max_epochs: Epochs, one step each; the cosine schedule spans them.
        kwargs: The settings every prompt method takes (``prompt_weights``, ``few_shot_source``,
            ``reference_seed``, ``inference_compile``, ...: :class:`~anomalib_faprompt.models.base.PromptMethod`).

    Raises:
        ValueError: If a setting is out of range (``k_shot=0`` included), before any CLIP weights load.
    """

    method_name = "PromptAD"
    learning_types: ClassVar[tuple[Learning, ...]] = (Learning.FEW_SHOT_PROMPTS, Learning.FEW_SHOT)
    training_rule: ClassVar[TrainingRule] = NormalFewShotPromptLearning()
    default_max_epochs = 100  # the release's, and the default of max_epochs
    prompt_setting_names: ClassVar[tuple[str, ...]] = (
        *PromptMethod.prompt_setting_names,
        "n_ctx",
        "category",
        "n_ctx_ab",
        "n_pro_ab",
        "n_pro_image",
        "n_pro_pixel",
        "memory_layers",
    )

    def __init__(
        self,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e32",
        image_size: int = 240,
        category: str | None = None,
        k_shot: int = 1,
        n_ctx: int = 4,
        n_ctx_ab: int = 1,
        n_pro_ab: int = 4,
        n_pro_image: int = 3,
        n_pro_pixel: int = 1,
        memory_layers: Sequence[int] = (4, 9),
        map_size: int | None = None,
        sigma: float | None = None,
        bgr_test_images: bool = False,
        lambda_align: float = 0.001,
        margin: float = 0.0,
        learning_rate: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        min_learning_rate: float = 1e-5,
        max_epochs: int | None = 100,
        **kwargs: Any,
    ) -> None:
        if k_shot == 0:
            msg = (
                "PromptAD: k_shot must be at least 1, got 0. PromptAD learns its prompts from k normal images of the "
                "category and scores against their visual memory; for zero-shot detection use AnomalyCLIP or FAPrompt."
            )
            raise ValueError(msg)
        learning_rate = check_float("learning_rate", learning_rate, low_open=True, why="SGD's step size")
        momentum = check_float("momentum", momentum, high=1.0, why="SGD's momentum")
        weight_decay = check_float("weight_decay", weight_decay, why="SGD's weight decay")
        min_learning_rate = check_float("min_learning_rate", min_learning_rate, why="where the cosine schedule ends")
        lambda_align = check_float("lambda_align", lambda_align, why="weight of the alignment loss")
        margin = check_float("margin", margin, low=float("-inf"), why="of the explicit anomaly margin loss")
        super().__init__(backbone=backbone, pretrained=pretrained, image_size=image_size, k_shot=k_shot,
                         max_epochs=max_epochs, **kwargs)  # fmt: skip
        self.loss = PromptADLoss(lambda_align=lambda_align, margin=margin)
        self.learning_rate, self.momentum, self.weight_decay = learning_rate, momentum, weight_decay
        self.min_learning_rate = min_learning_rate
        self._shots: PromptADFeatures | None = None
        recorded = (self.loaded_prompt_settings or {}).get("category")
        if category is None and recorded is not None:
            self._set_category(str(recorded), "the loaded prompts")

    def build_model(self) -> PromptADModel:
        """The torch model of the settings in ``hparams``; ``memory_layers`` recorded as a list."""
        names = ("backbone", "pretrained", "image_size", "category", "n_ctx", "n_ctx_ab", "n_pro_ab", "n_pro_image",
                 "n_pro_pixel", "memory_layers", "map_size", "sigma", "bgr_test_images")  # fmt: skip
        model = PromptADModel(**{name: self.hparams[name] for name in names})
        self.hparams["memory_layers"] = list(model.memory_layers)
        return model

    @classmethod
    def from_released(cls, image_checkpoint: str | Path, pixel_checkpoint: str | Path, **kwargs: Any) -> PromptAD:
        """Build a model from the release's two files of one category and sampling (its ``CLS-…`` and ``SEG-…``).

        Either the inference checkpoints (text prototypes and the two galleries: the model then scores as the
        release, without prompts to train further) or the prompt-learner states (re-encoded here; pass the
        ``category`` they were trained for). ``save_prompt_weights`` then writes them in this package's format.

        Example:
            >>> model = PromptAD.from_released(  # doctest: +SKIP
            ...     "CLS-bottle-k4.pt", "SEG-bottle-k4.pt", category="bottle"
            ... )

        Args:
            image_checkpoint: The image-level (``train_cls.py``) file.
            pixel_checkpoint: The pixel-level (``train_seg.py``) file.
            kwargs: Other settings of the model (the release's are the defaults).

        Raises:
            FileNotFoundError: If a file does not exist.
            ValueError: If they are not the release's files, or do not fit the settings (named).
        """
        contents = []
        for path in (Path(image_checkpoint), Path(pixel_checkpoint)):
            if not path.is_file():
                msg = f"Released PromptAD file '{path}' does not exist."
                raise FileNotFoundError(msg)
            content = torch.load(path, map_location="cpu", weights_only=True)
            contents.append(content.get("prompt_learner", content) if isinstance(content, dict) else content)
        model = cls(**kwargs)
        model.model.load_released(*contents, source=f"'{image_checkpoint}', '{pixel_checkpoint}'")
        return model

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The lifecycle's, and one validation after the last epoch.

        Validation only calibrates the post-processor's thresholds here (the last epoch's prompts are kept; the
        release instead tests after every epoch and keeps the best), so validating after each of the 100 epochs
        would only multiply the cost.
        """
        arguments = super().trainer_arguments
        if self.max_epochs is not None:
            arguments["check_val_every_n_epoch"] = self.max_epochs
        return arguments

    # The category: the prompts' object name and manual anomaly states ----------------------------------------

    def prompt_settings(self) -> dict[str, Any]:
        """The settings the prompts depend on; without ``category`` while it is not known yet."""
        settings = super().prompt_settings()
        if settings.get("category") is None:
            settings.pop("category", None)
        return settings

    def _set_category(self, category: str, source: str) -> None:
        self.model.set_category(category)
        self.hparams["category"] = category
        logger.info("PromptAD: prompts of category '%s' (from %s)", category, source)

    def setup(self, stage: str) -> None:
        """Take the category from the datamodule when none was given; warn when it differs from the prompts'."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        datamodule = getattr(datamodule, "target", datamodule)  # AuxiliaryDataModule: the target
        category = getattr(datamodule, "category", None) or None  # anomalib's Folder has an empty one
        if self.model.category is None:
            if category is None:
                msg = (
                    "PromptAD needs the category's name for its prompts (object name and manual anomaly states), and "
                    "the datamodule has no 'category'. Pass category=... (CLI: --model.category), e.g. 'bottle'."
                )
                raise ValueError(msg)
            self._set_category(str(category), f"the datamodule {type(datamodule).__name__}")
        elif category is not None and str(category) != self.model.category:
            logger.warning(
                "PromptAD: the prompts are those of category '%s', the data is '%s'.", self.model.category, category
            )
        super().setup(stage)

    # What the NormalFewShotPromptLearning rule needs (FewShotLearner) -------------------------------------------

    def prepare_shots(self, shots: torch.Tensor | None) -> None:
        """Encode the k shots once (the CLIP is frozen, so each step needs only their features); ``None`` drops them."""
        self._shots = self.model.encode_features(shots) if shots is not None else None

    def few_shot_losses(self) -> dict[str, torch.Tensor]:
        """Both heads' losses on the shots: the image head on their CLS features, the pixel head on their patches.

        The heads share no parameter, so the sum's gradients are each head's own, as the release's two trainings.
        """
        if self._shots is None:
            msg = "PromptAD: no shots prepared; the fit's on_fit_start samples them (NormalFewShotPromptLearning)."
            raise RuntimeError(msg)
        if self.model.released_prototypes.numel():
            msg = (
                "PromptAD: this model scores with a released inference checkpoint's prototypes, which hold no prompts "
                "to learn. Load the release's prompt-learner states instead, or fit a model built without them."
            )
            raise RuntimeError(msg)
        text = self.model.cached(self.model.encode_static_text)
        scale = self.model.logit_scale
        image = self.loss(self._shots.image, text["image"], scale)
        pixel = self.loss(self._shots.patches, text["pixel"], scale)
        terms = {"loss": image["loss"] + pixel["loss"]}
        for head, losses in (("image", image), ("pixel", pixel)):
            terms.update({f"{head}_{name}": losses[name] for name in ("v2t", "eam", "align")})
        return terms

    def configure_prompt_optimizers(self) -> dict[str, Any]:
        """SGD on the prompts with a cosine schedule over the fit's epochs, stepped once per epoch (the release's)."""
        optimizer = torch.optim.SGD(
            self.model.learnable_parameters(),
            lr=self.learning_rate,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        # The fit's epochs (the trainer's, which max_epochs sets); max_epochs when used outside a trainer.
        epochs = getattr(attached_trainer(self), "max_epochs", None)
        epochs = epochs if epochs and epochs > 0 else (self.max_epochs or 100)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=self.min_learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
