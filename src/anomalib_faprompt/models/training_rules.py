"""Training rules: what a prompt method learns from and how one step goes, as objects the method holds.

A method names its rule as a class attribute (``training_rule = MaskSupervisedPromptLearning()``); its Lightning
hooks (``on_fit_start``, ``configure_optimizers``, ``training_step``) hand over to it. A rule states what it needs
from the method in a typed protocol (:class:`MaskLearner`, :class:`FewShotLearner`) and what it gives the trainer
(:attr:`TrainingRule.learning_type`, :attr:`TrainingRule.trainer_arguments`):

- :class:`MaskSupervisedPromptLearning`: prompts learned on *anomalous* images with pixel masks, the zero-shot
  protocol's auxiliary training (AnomalyCLIP, FAPrompt), with Adam.
- :class:`NormalFewShotPromptLearning`: prompts learned on the k *normal* images of the target category that also
  form the visual memory, one step per epoch on all of them (PromptAD).
- :class:`NoPromptLearning`: prompts that are not learned (fixed, or only ever loaded): fitting is refused.

Example:
    >>> MaskSupervisedPromptLearning().learning_type.value
    'one_class'
    >>> NormalFewShotPromptLearning().trainer_arguments
    {'limit_train_batches': 1}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from anomalib import LearningType
from anomalib.data import Batch

from anomalib_faprompt.data.notices import empty_mask_warning

logger = logging.getLogger(__name__)

ZERO_SHOT_PROTOCOL = (
    "Zero-shot prompt learning needs anomalous training samples with masks: prompts are learned once on an "
    "auxiliary labelled dataset (e.g. the test split of all MVTec AD categories) and then applied unchanged to "
    "other datasets. Train on such data (anomalib_faprompt.data.AuxiliaryDataModule, or a datamodule whose train "
    "split holds anomalous images with masks), or load learned prompts with prompt_weights=... and run "
    "`anomalib test` directly."
)


class PromptMethodLike(Protocol):
    """What every rule needs from a method: its name, torch model, trainer and Lightning's logging."""

    method_name: str
    model: Any
    trainer: Any

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``LightningModule.log``."""

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``LightningModule.log_dict``."""


@runtime_checkable
class MaskLearner(PromptMethodLike, Protocol):
    """What :class:`MaskSupervisedPromptLearning` needs from a method."""

    learning_rate: float
    betas: Sequence[float]

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Loss terms of one step on images, binary masks (B, H, W) and labels (B,); ``loss`` is the total."""

    def check_finite_input(self, batch: Batch, stage: str) -> None:
        """Refuse a batch with non-finite pixels, naming its files."""


@runtime_checkable
class FewShotLearner(PromptMethodLike, Protocol):
    """What :class:`NormalFewShotPromptLearning` needs from a method."""

    k_shot: int

    def collect_references(self) -> torch.Tensor | None:
        """The k normal references (pre-processed), also filling the visual memory; ``None`` without a source."""

    def prepare_shots(self, shots: torch.Tensor) -> None:
        """Take the pre-processed shots (k, 3, H, W) before the first step (e.g. encode them once)."""

    def few_shot_losses(self) -> dict[str, Any]:
        """Loss terms of one step on the prepared shots; ``loss`` is the total."""

    def configure_prompt_optimizers(self) -> Any:
        """The optimiser (and schedule) of the prompts, in Lightning's ``configure_optimizers`` form."""


class TrainingRule(Protocol):
    """How a method learns its prompts; the method's Lightning hooks hand over to it."""

    #: What fitting means to anomalib's engine (it runs the fitting loop for ``ONE_CLASS``).
    learning_type: LearningType
    #: What the rule needs of the trainer, merged into the method's ``trainer_arguments``.
    trainer_arguments: dict[str, Any]

    def on_fit_start(self, method: Any) -> None:
        """Check the data and prepare before the first step."""

    def configure_optimizers(self, method: Any) -> Any:
        """The optimisers, in Lightning's ``configure_optimizers`` form."""

    def training_step(self, method: Any, batch: Batch) -> dict[str, Any]:
        """One step; returns the losses (``loss`` is the total)."""

    def on_fit_end(self, method: Any) -> None:
        """Drop what only the steps needed."""


def _require(method: Any, protocol: type, rule: str) -> None:
    if not isinstance(method, protocol):
        missing = [name for name in protocol.__annotations__ if not hasattr(method, name)]
        msg = (
            f"{type(method).__name__} cannot use {rule}: it lacks {missing or protocol.__name__} ({protocol.__name__})."
        )
        raise TypeError(msg)


@dataclass(frozen=True)
class MaskSupervisedPromptLearning:
    """Learn prompts from labelled anomalous images with masks (the auxiliary data of the zero-shot protocol).

    The method provides ``learning_rate``, ``betas`` (Adam, as both releases train) and ``training_losses``
    (:class:`MaskLearner`); the rule refuses a one-class train split at the start of a fit, warns when many
    anomalous training images have empty masks, and feeds every step the batch's binary masks and labels.
    """

    learning_type: LearningType = LearningType.ONE_CLASS
    trainer_arguments: dict[str, Any] = field(default_factory=dict)

    def on_fit_start(self, method: Any) -> None:
        """Refuse one-class train splits before any work is done; name empty masks."""
        _require(method, MaskLearner, type(self).__name__)
        samples = getattr(getattr(method.trainer.datamodule, "train_data", None), "samples", None)
        if samples is None:
            return
        if "label_index" in samples and not (samples["label_index"] == 1).any():
            msg = f"{method.method_name}: the train split has no anomalous samples (a one-class split). "
            raise ValueError(msg + ZERO_SHOT_PROTOCOL)
        if method.trainer.is_global_zero and (warning := empty_mask_warning(samples, f"{method.method_name}'s "
                                                                                    "training data")):  # fmt: skip
            logger.warning(warning)

    def configure_optimizers(self, method: Any) -> torch.optim.Optimizer:
        """Adam on the learnable parameters only, with the method's settings."""
        return torch.optim.Adam(method.model.learnable_parameters(), lr=method.learning_rate, betas=tuple(method.betas))

    def training_step(self, method: Any, batch: Batch) -> dict[str, Any]:
        """One prompt-learning step on labelled images with masks (the method's ``training_losses``)."""
        method.check_finite_input(batch, "train")
        if batch.gt_mask is None:
            msg = (
                f"{method.method_name} learns from pixel masks, but the training batch has none. Use a dataset with "
                "ground-truth masks for the anomalous samples. " + ZERO_SHOT_PROTOCOL
            )
            raise ValueError(msg)
        masks = (batch.gt_mask.float() > 0.5).float()
        masks = masks.squeeze(1) if masks.dim() == 4 else masks
        labels = batch.gt_label.long()
        losses = method.training_losses(batch.image, masks, labels)
        method.log_dict({f"train_{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(labels))
        return losses

    def on_fit_end(self, method: Any) -> None:
        """Nothing to drop."""
        del method


@dataclass(frozen=True)
class NormalFewShotPromptLearning:
    """Learn prompts from the ``k_shot`` normal reference images of the target category, one step per epoch.

    At the start of a fit the references are sampled as for scoring (``few_shot_source``, or ``reference_seed``
    over the normal images of the train split), fill the visual memory and are handed to the method's
    ``prepare_shots`` once: the CLIP is frozen, so their features do not change between steps and each step runs
    only what the prompts touch. Every epoch is one optimiser step on all k shots together, as PromptAD's release
    trains (its batch of 400 holds every shot). Lightning still drives the loop (epochs, schedule, precision,
    progress, checkpoints) over the datamodule's train loader, limited to one batch per epoch; that batch only
    paces the loop, the step itself uses the k shots.
    """

    learning_type: LearningType = LearningType.ONE_CLASS
    trainer_arguments: dict[str, Any] = field(default_factory=lambda: {"limit_train_batches": 1})

    def on_fit_start(self, method: Any) -> None:
        """Sample the k shots (they also fill the visual memory) and prepare them."""
        _require(method, FewShotLearner, type(self).__name__)
        shots = method.collect_references()
        if shots is None:
            msg = (
                f"{method.method_name} learns its prompts from k_shot={method.k_shot} normal images, but the fit has "
                "no train split to sample them from. Fit on a datamodule with normal training images, or pass "
                "few_shot_source=/folder/of/normal/images (CLI: --model.few_shot_source)."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(shots).all()):
            msg = f"{method.method_name}: the {len(shots)} normal reference image(s) hold non-finite values."
            raise ValueError(msg)
        method.prepare_shots(shots)

    def configure_optimizers(self, method: Any) -> Any:
        """The method's own optimiser and schedule."""
        return method.configure_prompt_optimizers()

    def training_step(self, method: Any, batch: Batch) -> dict[str, Any]:
        """One step on all k shots (the loader's ``batch`` only paces the loop, see the class docstring)."""
        del batch
        losses = method.few_shot_losses()
        # The total in the progress bar; each term to the loggers only (a bar of 80 columns has no room for seven).
        method.log("train_loss", losses["loss"], prog_bar=True, batch_size=method.k_shot)
        terms = {f"train_{name}": value for name, value in losses.items() if name != "loss"}
        method.log_dict(terms, batch_size=method.k_shot)
        return losses

    def on_fit_end(self, method: Any) -> None:
        """Drop the shots' prepared features (kept only for the steps)."""
        method.prepare_shots(None)


@dataclass(frozen=True)
class NoPromptLearning:
    """Prompts that are not learned (fixed in the method, or only loaded): the method scores zero-shot."""

    learning_type: LearningType = LearningType.ZERO_SHOT
    trainer_arguments: dict[str, Any] = field(default_factory=dict)

    def on_fit_start(self, method: Any) -> None:
        """Refuse a fit: there is nothing to learn."""
        msg = f"{method.method_name} learns nothing: its prompts are fixed. Test or predict with it directly."
        raise ValueError(msg)

    def configure_optimizers(self, method: Any) -> None:
        """No optimiser."""
        del method

    def training_step(self, method: Any, batch: Batch) -> dict[str, Any]:
        """Never called: fitting is refused."""
        raise NotImplementedError

    def on_fit_end(self, method: Any) -> None:
        """Nothing to drop."""
        del method
