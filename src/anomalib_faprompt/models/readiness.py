"""Whether a prompt method's prompts may score: trained (an optimiser step changed them) or loaded.

Untrained prompts are random draws whose scores look like numbers and mean nothing. :class:`PromptReadiness`, a
part of :class:`~anomalib_faprompt.models.base.PromptMethod`, marks prompts trained only after an optimiser step
changed them, and refuses to test, predict, validate outside a fit, save or export before that (unless the model
was built with ``allow_untrained_prompts=True``), saying what the last fit did.

Example:
    >>> from anomalib_faprompt import FAPrompt
    >>> model = FAPrompt(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10)
    >>> model.check_prompts_ready("test")
    Traceback (most recent call last):
    ...
    anomalib_faprompt.models.readiness.UntrainedPromptsError: FAPrompt cannot test: its prompts were neither ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from anomalib_faprompt.clip.prompted_clip import PromptedCLIP


class UntrainedPromptsError(RuntimeError):
    """The model was asked to score images with prompts that were neither trained nor loaded."""


class PromptReadiness:
    """Prompts count as trained once an optimiser step has changed them (see the module docstring).

    Why a post-step hook on the torch optimiser and a comparison with the initial values: a training batch is not
    an update. Gradient accumulation steps every few batches, AMP's GradScaler skips ``optimizer.step()`` when a
    gradient is inf/NaN, manual optimisation steps where it chooses, and a step whose parameters have no gradient
    changes nothing. The hook runs only after a real ``optimizer.step()``, whoever calls it, and the comparison
    makes sure that step changed the learned values.
    """

    model: PromptedCLIP
    method_name: str
    allow_untrained_prompts: bool
    trainer: Any

    def check_prompts_ready(self, stage: str) -> None:
        """Refuse to ``stage`` (test, predict, export, …) with untrained prompts, saying what the last fit did.

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded, unless untrained ones are allowed.
        """
        if bool(self.model.prompts_ready) or self.allow_untrained_prompts:
            return
        last_fit = getattr(self, "last_fit", None)
        cause = (
            f" The last fit made {last_fit['steps']} optimiser steps (max_epochs={last_fit['max_epochs']}) and none "
            "changed the prompts: train for at least one epoch on data the method learns from."
            if last_fit is not None
            else ""
        )
        msg = (
            f"{self.method_name} cannot {stage}: its prompts were neither trained nor loaded, so its scores would be "
            f"meaningless.{cause} Train it first, pass prompt_weights=/path/to/prompts (CLI: --model.prompt_weights), "
            "or set allow_untrained_prompts=True for experiments."
        )
        raise UntrainedPromptsError(msg)

    def on_train_start(self) -> None:
        """Watch the optimisers' steps: the prompts count as trained once a step has changed them."""
        super().on_train_start()  # type: ignore[misc]
        self._watch_optimizer_steps(self.trainer.optimizers)

    def on_train_end(self) -> None:
        """Stop watching the optimisers."""
        super().on_train_end()  # type: ignore[misc]
        self._unwatch_optimizer_steps()

    def on_fit_end(self) -> None:
        """Remember what the fit did, to explain untrained prompts (e.g. ``--trainer.max_epochs 0``) later."""
        super().on_fit_end()  # type: ignore[misc]
        self.last_fit = {"steps": self.trainer.global_step, "max_epochs": self.trainer.max_epochs}

    def _watch_optimizer_steps(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._unwatch_optimizer_steps()
        if bool(self.model.prompts_ready):
            return
        self._initial_prompts = self.model.prompt_state_dict()
        self._step_hooks = [optimizer.register_step_post_hook(self._after_optimizer_step) for optimizer in optimizers]

    def _unwatch_optimizer_steps(self) -> None:
        for handle in getattr(self, "_step_hooks", ()):
            handle.remove()
        self._step_hooks: list[Any] = []
        self._initial_prompts: dict[str, torch.Tensor] | None = None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        del optimizer, args, kwargs
        initial = self._initial_prompts
        if initial is None:
            return
        current = dict(self.model.named_parameters())
        if any(not torch.equal(current[name].detach(), value) for name, value in initial.items()):
            self.model.prompts_ready.fill_(True)
            self._unwatch_optimizer_steps()
