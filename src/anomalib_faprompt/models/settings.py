"""The settings every prompt method shares, in one typed object, checked once.

:class:`SharedSettings` holds what :class:`~anomalib_faprompt.models.base.PromptMethod` takes besides a method's
own settings: the CLIP (``backbone``, ``pretrained``, ``image_size``, which its torch model checks against the
backbone before any weights load), the prompt file, the epochs, the few-shot references and the run-time choices.
The constructors stay flat (``--model.image_size`` on the CLI, ``image_size:`` in YAML); the object is what the
parts of the lifecycle read (``model.settings.k_shot``).

Example:
    >>> settings = SharedSettings.checked(backbone="ViT-B-16", pretrained=None, image_size=224, k_shot=2)
    >>> settings.k_shot, settings.few_shot_source
    (2, None)
    >>> SharedSettings.checked(backbone="ViT-B-16", pretrained=None, image_size=224, k_shot=-1)
    Traceback (most recent call last):
    ...
    ValueError: k_shot must be an integer >= 0 (normal reference images; 0 is zero-shot), got -1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from anomalib_faprompt.clip.compiled import check_compile_mode
from anomalib_faprompt.clip.settings import check_max_epochs
from anomalib_faprompt.models.reference_memory import check_references
from anomalib_faprompt.post_processing.normal_fpr import check_normal_images
from anomalib_faprompt.post_processing.normal_quantile import check_rate


@dataclasses.dataclass(frozen=True)
class SharedSettings:
    """What every prompt method takes besides its own settings (the arguments of ``PromptMethod.__init__``)."""

    #: open_clip architecture name or path to an open_clip JSON config.
    backbone: str
    #: open_clip pretrained tag, path to a weights file (OpenAI JIT archive or state dict), or ``None`` (random).
    pretrained: str | None
    #: Square input size; the pre-processor resizes to it (a multiple of the backbone's patch size).
    image_size: int
    #: Learned prompts to load (a file from ``save_prompt_weights``, a Lightning checkpoint, or a released file).
    prompt_weights: str | Path | None = None
    #: Allow scoring, saving and exporting prompts no optimiser step changed (experiments only).
    allow_untrained_prompts: bool = False
    #: Load prompts (or a checkpoint) learned with other settings anyway.
    allow_setting_mismatch: bool = False
    #: Epochs of a fit; ``None`` leaves it to the trainer (the method's default if the trainer sets none either).
    max_epochs: int | None = None
    #: Normal reference images in the visual memory (0: none).
    k_shot: int = 0
    #: An image or folder of normal reference images, instead of sampling the train split.
    few_shot_source: Path | None = None
    #: Seed of the sampling of the references from the train split.
    reference_seed: int = 0
    #: ``torch.compile`` mode of the frozen vision encoder at inference, ``None`` for eager.
    inference_compile: str | None = None
    #: Share of normal images to flag: thresholds from normal images only (``None``: anomalib's F1-adaptive ones).
    normal_fpr: float | None = None
    #: A folder of normal images to set those thresholds on, instead of the validation split's normal images.
    normal_images: Path | None = None

    @classmethod
    def checked(cls, **settings: Any) -> SharedSettings:
        """The settings with each checked and in its plain form.

        Raises:
            ValueError: For a setting out of range, naming it, its range and the value.
            FileNotFoundError: For a ``few_shot_source`` that does not exist.
        """
        k_shot, source, seed = check_references(
            settings.pop("k_shot", 0), settings.pop("few_shot_source", None), settings.pop("reference_seed", 0)
        )
        max_epochs = check_max_epochs(settings.pop("max_epochs", None))
        inference_compile = check_compile_mode(settings.pop("inference_compile", None))
        normal_fpr = settings.pop("normal_fpr", None)
        normal_fpr = None if normal_fpr is None else check_rate("normal_fpr", normal_fpr)
        normal_images = check_normal_images(settings.pop("normal_images", None), normal_fpr)
        if normal_images is not None and normal_fpr is None:
            msg = "normal_images is only used with normal_fpr: set normal_fpr (e.g. 0.01) too, or leave it out."
            raise ValueError(msg)
        return cls(**settings, k_shot=k_shot, few_shot_source=source, reference_seed=seed, max_epochs=max_epochs,
                   inference_compile=inference_compile, normal_fpr=normal_fpr,
                   normal_images=normal_images)  # fmt: skip


class Setting:
    """A read-only attribute of a prompt method that reads its :class:`SharedSettings` (``model.k_shot``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance.settings, self.name)
