"""Training rules a prompt method opts into, beside the prompt lifecycle of :mod:`.prompt_module`.

A training rule says what a method learns from and how one step goes: which data it accepts, the
targets it takes from a batch, the optimiser and the training step. The prompt lifecycle (loading,
saving, validity, references, scoring, export) is the same for every method and knows nothing of it.

- :class:`MaskSupervisedPromptLearning`: prompts learned on *anomalous* images with pixel masks, the
  zero-shot protocol's auxiliary training (AnomalyCLIP, FAPrompt).
- :class:`NormalFewShotPromptLearning`: prompts learned on the k *normal* images of the target category that
  also form the visual memory, one step per epoch on all of them (PromptAD).

A method combines the lifecycle, one rule and anomalib's module, in that order, so that every hook
runs through all of them (each calls ``super()``)::

    class MyMethod(PromptLifecycleMixin, MaskSupervisedPromptLearning, AnomalibModule): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch

ZERO_SHOT_PROTOCOL = (
    "Zero-shot prompt learning needs anomalous training samples with masks: prompts are learned once on an "
    "auxiliary labelled dataset (e.g. the test split of all MVTec AD categories) and then applied unchanged to "
    "other datasets. Train on such data (anomalib_faprompt.data.AuxiliaryDataModule, or a datamodule whose train "
    "split holds anomalous images with masks), or load learned prompts with prompt_weights=... and run "
    "`anomalib test` directly."
)


class MaskSupervisedPromptLearning(ABC):
    """Learn prompts from labelled anomalous images with masks (the auxiliary data of the zero-shot protocol).

    The method provides :attr:`learning_rate`, :attr:`betas` (Adam, as both releases train) and
    :meth:`training_losses`; the rule refuses a one-class train split at the start of a fit and feeds every
    step the batch's binary masks and labels.
    """

    method_name: str
    learning_rate: float
    betas: Sequence[float]

    #: What fitting this rule means to anomalib's engine: it runs the fitting loop for ``ONE_CLASS`` (anomalib
    #: has no learning type for training on labelled anomalies); the train split is checked to hold anomalies.
    training_learning_type = LearningType.ONE_CLASS

    @abstractmethod
    def training_losses(
        self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one step on images, binary masks (B, H, W) and labels (B,); ``loss`` is the total."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the learnable parameters only, with the release's settings."""
        return torch.optim.Adam(self.model.learnable_parameters(), lr=self.learning_rate, betas=tuple(self.betas))

    def on_fit_start(self) -> None:
        """Refuse one-class train splits before any work is done."""
        super().on_fit_start()
        self._check_train_split()

    def _check_train_split(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_data", None)
        samples = getattr(dataset, "samples", None)
        if samples is not None and "label_index" in samples and not (samples["label_index"] == 1).any():
            msg = (
                f"{self.method_name}: the train split has no anomalous samples (a one-class split). "
                + ZERO_SHOT_PROTOCOL
            )
            raise ValueError(msg)

    def _training_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.gt_mask is None:
            msg = (
                f"{self.method_name} learns from pixel masks, but the training batch has none. Use a dataset with "
                "ground-truth masks for the anomalous samples. " + ZERO_SHOT_PROTOCOL
            )
            raise ValueError(msg)
        masks = (batch.gt_mask.float() > 0.5).float()
        masks = masks.squeeze(1) if masks.dim() == 4 else masks
        return masks, batch.gt_label.long()

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One prompt-learning step on labelled images with masks (the method's :meth:`training_losses`)."""
        del args, kwargs
        self._check_finite_input(batch, "train")
        masks, labels = self._training_targets(batch)
        losses = self.training_losses(batch.image, masks, labels)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(labels))
        return losses


class NormalFewShotPromptLearning(ABC):
    """Learn prompts from the ``k_shot`` normal reference images of the target category, one step per epoch.

    At the start of a fit the references are sampled as for scoring (``few_shot_source``, or ``reference_seed``
    over the normal images of the train split), fill the visual memory and are handed to :meth:`prepare_shots`
    once: the CLIP is frozen, so their features do not change between steps and each step runs only what the
    prompts touch. Every epoch is one optimiser step on all k shots together, as PromptAD's release trains
    (its batch of 400 holds every shot). Lightning still drives the loop (epochs, schedule, precision, progress,
    checkpoints) over the datamodule's train loader, limited to one batch per epoch; that batch only paces the
    loop, the step itself uses the k shots.

    The method provides :meth:`prepare_shots`, :meth:`few_shot_losses` and ``configure_optimizers``.
    """

    method_name: str
    k_shot: int

    #: Fitting runs anomalib's loop for ``ONE_CLASS`` data: the train split's normal images.
    training_learning_type = LearningType.ONE_CLASS
    #: One optimiser step per epoch (the step uses the k shots, not the loader's batch).
    training_trainer_arguments: ClassVar[dict[str, Any]] = {"limit_train_batches": 1}

    @abstractmethod
    def prepare_shots(self, shots: torch.Tensor) -> None:
        """Take the pre-processed shots (k, 3, H, W) before the first step (e.g. encode them once)."""

    @abstractmethod
    def few_shot_losses(self) -> dict[str, torch.Tensor]:
        """Loss terms of one step on the prepared shots; ``loss`` is the total."""

    def on_fit_start(self) -> None:
        """Sample the k shots (they also fill the visual memory) and prepare them."""
        super().on_fit_start()
        shots = self._collect_references()
        if shots is None:
            msg = (
                f"{self.method_name} learns its prompts from k_shot={self.k_shot} normal images, but the fit has no "
                "train split to sample them from. Fit on a datamodule with normal training images, or pass "
                "few_shot_source=/folder/of/normal/images (CLI: --model.few_shot_source)."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(shots).all()):
            msg = f"{self.method_name}: the {len(shots)} normal reference image(s) hold non-finite values."
            raise ValueError(msg)
        self.prepare_shots(shots)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One step on all k shots (the loader's ``batch`` only paces the loop, see the class docstring)."""
        del batch, args, kwargs
        losses = self.few_shot_losses()
        # The total in the progress bar; each term to the loggers only (a bar of 80 columns has no room for seven).
        self.log("train_loss", losses["loss"], prog_bar=True, batch_size=self.k_shot)
        terms = {f"train_{name}": value for name, value in losses.items() if name != "loss"}
        self.log_dict(terms, batch_size=self.k_shot)
        return losses
