"""Prompt files and checkpoints of a prompt method: what they hold, where they come from, whether they fit.

:class:`PromptFiles`, a part of :class:`~anomalib_faprompt.models.base.PromptMethod`, loads ``prompt_weights`` at
construction, writes prompt files (``save_prompt_weights``, and a ``prompts.pt`` beside every Lightning checkpoint
through :class:`PromptWeightsCheckpoint`) and records in both the settings the prompts depend on
(:meth:`PromptFiles.prompt_settings`: the method, the CLIP's identity and the method's ``prompt_setting_names``).
Loading prompts or a checkpoint learned with other settings is refused naming them, as is a damaged file (its
checksums are compared before it loads: :mod:`~anomalib_faprompt.file_integrity`) or one holding non-finite values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_faprompt.compat import attached_trainer
from anomalib_faprompt.file_integrity import check_file, is_file_path
from anomalib_faprompt.methods import RUN_TIME_SETTINGS
from anomalib_faprompt.models.readiness import UntrainedPromptsError
from anomalib_faprompt.prompt_settings import check_settings, clip_identity, hyper_parameter_settings, plain_data
from anomalib_faprompt.prompt_weights import (
    check_checkpoint_method,
    check_finite,
    load_prompt_weights,
    save_prompt_weights,
)

if TYPE_CHECKING:
    from anomalib_faprompt.clip.prompted_clip import PromptedCLIP

logger = logging.getLogger(__name__)


class PromptWeightsCheckpoint(Callback):
    """Write the learned prompts as a small ``prompts.pt`` next to each Lightning checkpoint (trained ones only)."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the prompt file into the checkpoint callback's folder."""
        del checkpoint
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None or not trainer.is_global_zero:
            return
        if not bool(pl_module.model.prompts_ready):
            logger.warning("Not writing %s/prompts.pt: no optimiser step has updated the prompts yet.", dirpath)
            return
        pl_module.save_prompt_weights(Path(dirpath) / "prompts.pt")


class PromptFiles:
    """Prompt files and checkpoints of a prompt method (see the module docstring)."""

    model: PromptedCLIP
    method_name: ClassVar[str]
    #: The settings the prompts depend on (recorded and compared, :meth:`prompt_settings`); each class adds its own.
    prompt_setting_names: ClassVar[tuple[str, ...]] = ("image_size",)
    hparams: Any
    allow_untrained_prompts: bool
    allow_setting_mismatch: bool

    def load_initial_prompts(self, prompt_weights: str | Path | None) -> None:
        """Record the CLIP's identity and load ``prompt_weights`` (at the end of construction).

        Raises:
            UntrainedPromptsError: If the file holds untrained prompts and the model does not allow them.
        """
        self._clip_identity = clip_identity(self.hparams["backbone"], self.hparams["pretrained"])
        #: The settings the loaded prompt file records (``None`` without one, or when it records none).
        self.loaded_prompt_settings: dict[str, Any] | None = None
        if prompt_weights is None:
            return
        loaded = load_prompt_weights(self.model, prompt_weights, self.method_name, self.prompt_settings(),
                                     allow_setting_mismatch=self.allow_setting_mismatch)  # fmt: skip
        self.loaded_prompt_settings = loaded.settings
        if not loaded.trained and not self.allow_untrained_prompts:
            msg = (
                f"'{prompt_weights}' holds untrained prompts (saved from a model that made no optimiser step, with "
                "allow_untrained_prompts=True); their scores would be meaningless. Load trained prompts, or pass "
                "allow_untrained_prompts=True for experiments."
            )
            raise UntrainedPromptsError(msg)

    def prompt_settings(self) -> dict[str, Any]:
        """The settings the prompts depend on: method, CLIP identity and the class's ``prompt_setting_names``.

        Recorded in prompt files and Lightning checkpoints; loading prompts recorded with other values is refused
        unless the model was built with ``allow_setting_mismatch=True``.
        """
        return {
            "method": self.method_name,
            **self._clip_identity,
            **hyper_parameter_settings(self.hparams, self.prompt_setting_names),
        }

    def save_prompt_weights(self, path: str | Path) -> Path:
        """Write the learned prompts to a small file loadable with ``prompt_weights=``.

        The file records the settings the prompts depend on (:meth:`prompt_settings`), compared when it is
        loaded, and whether they are trained.

        Raises:
            UntrainedPromptsError: If no optimiser step changed the prompts and none were loaded, unless the
                model allows untrained prompts; the file then records them as untrained.
            NonFiniteValuesError: If a learned value is NaN or infinite.
        """
        trained = bool(self.model.prompts_ready)
        if not trained and not self.allow_untrained_prompts:
            msg = (
                f"{self.method_name}: not saving prompts to '{path}': they were neither trained (no optimiser step "
                "changed them, e.g. max_epochs=0 or every step skipped) nor loaded. Train first, or construct the "
                "model with allow_untrained_prompts=True to save them marked as untrained."
            )
            raise UntrainedPromptsError(msg)
        settings = {key: value for key, value in self.hparams.items() if key not in RUN_TIME_SETTINGS}
        return save_prompt_weights(self.model, path, self.method_name, settings, self.prompt_settings(), trained)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Load as anomalib does, after refusing a damaged file (its checksums are compared first).

        Raises:
            DamagedFileError: If the file's bytes do not match the checksums it was written with.
        """
        if is_file_path(checkpoint_path):
            check_file(checkpoint_path, "Checkpoint")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store plain hyper-parameters and the settings the prompts depend on."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint["hyper_parameters"] = plain_data(checkpoint.get("hyper_parameters", {}))
        checkpoint["prompt_settings"] = self.prompt_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse damaged checkpoints, and those with non-finite learned values or learned with other settings.

        A trainer's ``ckpt_path`` (``Engine.test(ckpt_path=...)``, the CLI) is checked against its checksums here,
        before its values are restored: ``torch.load`` reads a file whose tensor bytes changed without a word.

        Raises:
            DamagedFileError: If the trainer's checkpoint file does not match its checksums.
            NonFiniteValuesError: If a learned value is NaN or infinite.
            SettingsMismatchError: If the checkpoint's settings differ from this model's (unless
                ``allow_setting_mismatch``); checkpoints without ``prompt_settings`` compare their
                ``hyper_parameters``.
        """
        ckpt_path = getattr(attached_trainer(self), "ckpt_path", None)
        if is_file_path(ckpt_path):
            check_file(ckpt_path, "Checkpoint")
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        learned = {key: value for key, value in checkpoint.get("state_dict", {}).items() if key.startswith("model.")}
        check_finite(learned, "(Lightning checkpoint)")
        check_checkpoint_method(checkpoint, self.method_name, "(Lightning checkpoint)")  # even with the override
        if not self.allow_setting_mismatch:
            current = self.prompt_settings()
            recorded = checkpoint.get("prompt_settings") or hyper_parameter_settings(
                checkpoint.get("hyper_parameters", {}), tuple(current)
            )
            check_settings(recorded, current, "(Lightning checkpoint)")
