"""Callbacks for a readable console: progress bars that say what they run.

Lightning's bars say ``Epoch 0/0``, ``Validation``, ``Testing``; a ``zero_shot`` run or a script that evaluates
several models and categories shows a column of such bars with nothing to tell them apart. The prompt models put a
:class:`RunProgressBar` in place of Lightning's default bar when a trainer attaches them
(:func:`hand_over_callbacks`, from their ``configure_callbacks``), so each bar reads
``FAPrompt · MVTecAD/disc · Testing``. A progress bar the user chose (another class, or none) is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback, RichProgressBar

from anomalib_faprompt.compat import attached_trainer, rich_bar_settings

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

SEPARATOR = " · "


def _data_label(datamodule: Any) -> str | None:
    """``<dataset>/<category>`` (or the dataset's name) of an anomalib datamodule."""
    if datamodule is None:
        return None
    name = getattr(datamodule, "name", None) or type(datamodule).__name__
    category = getattr(datamodule, "category", None)
    return f"{name}/{category}" if category else str(name)


def _training_label(datamodule: Any) -> str | None:
    """The training data: an ``AuxiliaryDataModule`` learns on its auxiliary datamodules, not on its target."""
    auxiliary = getattr(datamodule, "auxiliary", None)
    if not isinstance(auxiliary, Sequence) or not auxiliary:
        return _data_label(datamodule)
    names = {getattr(part, "name", None) or type(part).__name__ for part in auxiliary}
    categories = [getattr(part, "category", None) for part in auxiliary]
    if len(names) == 1 and all(categories):
        (name,) = names
        return f"{name}/{'+'.join(categories)}" if len(categories) <= 3 else f"{name} ({len(categories)} categories)"
    return f"{len(auxiliary)} datasets"


def _predict_label(trainer: Trainer) -> str | None:
    """The folder of the predicted images (``anomalib predict --data <folder>`` has no datamodule)."""
    dataloaders = trainer.predict_dataloaders
    dataloaders = dataloaders if isinstance(dataloaders, Sequence) else [dataloaders]
    folders = {
        Path(filename).parent.name
        for dataloader in dataloaders
        for filename in getattr(getattr(dataloader, "dataset", None), "image_filenames", [])
    }
    return folders.pop() if len(folders) == 1 else None


def describe_run(trainer: Trainer, stage: str) -> str:
    """``<model> · <dataset>/<category> · <stage>``: what a progress bar runs.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(
        ...     lightning_module=SimpleNamespace(name="FAPrompt"),
        ...     datamodule=SimpleNamespace(name="MVTecAD", category="disc"),
        ... )
        >>> describe_run(trainer, "Testing")
        'FAPrompt · MVTecAD/disc · Testing'
    """
    module = trainer.lightning_module
    model = getattr(module, "name", None) or type(module).__name__
    datamodule = getattr(trainer, "datamodule", None)
    if stage.startswith("Epoch"):
        data = _training_label(datamodule)
    elif stage == "Predicting" and datamodule is None:
        data = _predict_label(trainer)
    else:
        data = _data_label(datamodule)
    return SEPARATOR.join(part for part in (model, data, stage) if part)


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar whose descriptions name the model, the dataset and the category."""

    @classmethod
    def like(cls, bar: RichProgressBar) -> RunProgressBar:
        """A bar with ``bar``'s settings (refresh rate, leave, theme, console)."""
        run_bar = cls(refresh_rate=bar.refresh_rate, theme=bar.theme, **rich_bar_settings(bar))
        if not bar.is_enabled:
            run_bar.disable()
        return run_bar

    @property
    def sanity_check_description(self) -> str:
        """Description of the sanity check bar."""
        return describe_run(self.trainer, "Sanity Checking")

    @property
    def validation_description(self) -> str:
        """Description of the validation bar."""
        return describe_run(self.trainer, "Validation")

    @property
    def test_description(self) -> str:
        """Description of the test bar."""
        return describe_run(self.trainer, "Testing")

    @property
    def predict_description(self) -> str:
        """Description of the prediction bar."""
        return describe_run(self.trainer, "Predicting")

    def _get_train_description(self, current_epoch: int) -> str:
        epoch = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None:
            epoch += f"/{self.trainer.max_epochs - 1}"
        return describe_run(self.trainer, epoch)


#: Marks the callbacks a model creates anew each time a trainer asks for them.
MODEL_CREATED = "_created_by_model_for_each_stage"


def hand_over_callbacks(module: LightningModule, callbacks: list[Callback]) -> list[Callback]:
    """Prepare the trainer attaching ``module`` for ``callbacks``, the module's ``configure_callbacks`` result.

    - Lightning's default rich bar is replaced, in place, by a :class:`RunProgressBar` with its settings.
    - The callbacks this module handed over for a previous stage of the same trainer (``engine.test`` validates
      first; ``anomalib train`` tests after fitting) are taken out of the trainer's list before Lightning replaces
      them: they are the same objects again, or new copies of the module's own (marked with :data:`MODEL_CREATED`),
      not callbacks passed to the trainer, about which Lightning's "will override existing callbacks passed to
      Trainer" note is meant. Callbacks the user passed still get that note.
    """
    trainer = attached_trainer(module)
    if trainer is None:
        return callbacks
    handed_over = {id(callback) for callback in callbacks}
    kept = []
    for callback in trainer.callbacks:
        if id(callback) in handed_over or getattr(callback, MODEL_CREATED, False):
            continue
        kept.append(RunProgressBar.like(callback) if type(callback) is RichProgressBar else callback)
    trainer.callbacks = kept
    return callbacks
