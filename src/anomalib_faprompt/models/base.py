"""The Lightning base of every prompt method: the settings they share, the parts of their lifecycle, their rule.

A method subclasses :class:`PromptMethod` (or :class:`~anomalib_faprompt.models.zero_shot_method.ZeroShotPromptMethod`
for the DPAM prompt methods trained on auxiliary data), declares only its own settings in ``__init__`` and passes the
shared ones on with ``**kwargs``: jsonargparse and Lightning's ``hparams`` follow them, so the CLI and YAML configs
stay flat (``--model.image_size``). It names its identity and training rule as class attributes and builds its torch
model from ``hparams`` in :meth:`PromptMethod.build_model`::

    class MyMethod(PromptMethod, AnomalibModule):  # AnomalibModule again: get_model("MyMethod") finds it
        method_name = "MyMethod"
        learning_types = (Learning.ZERO_SHOT,)
        training_rule = NoPromptLearning()

        def __init__(self, sigma: float = 4.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)

        def build_model(self) -> PromptedCLIP:
            return MyModel(self.hparams["backbone"], ..., sigma=self.hparams["sigma"])

The lifecycle is in parts, each one job: :class:`~.anomalib_parts.AnomalibParts` (components, thresholds,
callbacks), :class:`~.prompt_files.PromptFiles` (prompt files, checkpoints, provenance),
:class:`~.reference_memory.ReferenceMemory` (few-shot references), :class:`~.readiness.PromptReadiness` (trained or
loaded), :class:`~.scoring.GuardedScoring` (steps and ``forward`` with their guards) and
:class:`~.exporting.PromptExport`. How prompts are learned is the method's :attr:`PromptMethod.training_rule`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.data.validation import check_masks_before_setup, validate_trainer_data
from anomalib_faprompt.methods import Learning
from anomalib_faprompt.models.anomalib_parts import AnomalibParts, normal_fpr_post_processor
from anomalib_faprompt.models.exporting import PromptExport
from anomalib_faprompt.models.prompt_files import PromptFiles
from anomalib_faprompt.models.readiness import PromptReadiness
from anomalib_faprompt.models.reference_memory import ReferenceMemory
from anomalib_faprompt.models.scoring import GuardedScoring
from anomalib_faprompt.models.settings import Setting, SharedSettings
from anomalib_faprompt.models.training_rules import TrainingRule
from anomalib_faprompt.prompt_settings import plain_data

logger = logging.getLogger(__name__)

#: The epochs Lightning runs when neither ``max_epochs`` nor ``max_steps`` is set ("defaults to max_epochs = 1000").
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


class PromptMethod(
    AnomalibParts, PromptFiles, ReferenceMemory, PromptReadiness, GuardedScoring, PromptExport, AnomalibModule
):
    """Base of the prompt methods (see the module docstring).

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip pretrained tag, path to a weights file (OpenAI JIT archive or state dict), or
            ``None`` for random weights.
        image_size: Square input size (a multiple of the backbone's patch size); the pre-processor resizes to it.
        prompt_weights: Learned prompts to load: a file from ``save_prompt_weights``, a Lightning checkpoint of the
            method, or the authors' released file where the method has one. With it the model scores without
            fitting (zero-shot, or few-shot with ``k_shot`` references).
        allow_untrained_prompts: Allow testing, predicting, saving and exporting prompts no optimiser step changed
            (experiments only: untrained prompts are random draws; set ``seed_everything`` to compare runs).
        allow_setting_mismatch: Load ``prompt_weights`` (or a checkpoint) learned with other settings anyway. Prompt
            files and checkpoints record the CLIP (its config's hash, and the weights file's size and a hash of its
            first and last MiB, or the open_clip tag) and the settings the prompts' shapes and meaning depend on;
            by default loading them into a model with other values is refused, naming each setting.
        max_epochs: Epochs of prompt learning. ``None`` leaves it to the trainer; with neither set the method's
            default (``default_max_epochs``, the release's) is used, not Lightning's 1000. When set it overrides the
            trainer's value, for runners that take no trainer config (``anomalib benchmark``); at least 1.
        k_shot: Normal reference images whose patch features form a visual memory fused with the prompts' map and
            score (0: zero-shot). Sampled with ``reference_seed`` from the normal images of the datamodule's train
            split (the target's for ``AuxiliaryDataModule``) before validation, test and prediction, or the first
            ``k_shot`` images of ``few_shot_source``. A checkpoint keeps the memory of its last run, used only where
            no train split or source is available (predicting on a folder, export).
        few_shot_source: An image or folder of normal reference images to use instead of the train split.
        reference_seed: Seed of the sampling of the references from the train split.
        inference_compile: Run the frozen vision encoder under ``torch.compile`` at inference (test, predict,
            validation): ``"reduce-overhead"`` (CUDA graphs on GPUs: lowest batch-1 latency), ``"default"``,
            ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``; ``None`` (default) runs eagerly. Each new input
            shape compiles once (warm-up logged); training and export stay eager. Outputs equal eager within 1e-5.
        normal_fpr: Set the thresholds from normal images only, so that this share of normal images is flagged
            anomalous (e.g. 0.01), instead of anomalib's F1-adaptive thresholds, which need anomalous validation
            images. The normal images are those of the validation split (or ``normal_images``); at least
            ``1 / normal_fpr - 1`` of them. The default post-processor becomes
            :class:`~anomalib_faprompt.post_processing.NormalFPRPostProcessor`; the thresholds are saved in
            checkpoints and exported graphs.
        normal_images: A folder of normal images to set the ``normal_fpr`` thresholds on instead.
            With ``normal_fpr`` the default evaluator also reports ``image_FPR`` and ``image_TPR`` at the threshold.
        pre_processor: Pre-processor, or ``True`` for the default (antialiased bicubic resize, CLIP normalisation).
        post_processor: Post-processor, or ``True`` for anomalib's default (with ``normal_fpr``, the normal-image one).
        evaluator: Evaluator, or ``True`` for the papers' metrics (image AUROC and AP, pixel AUROC and AUPRO) and
            image F1; threshold-free metrics are computed on raw outputs, before post-processing.
        visualizer: Visualizer, or ``True`` for heat-maps with titled panels.

    Raises:
        ValueError: If a setting is out of range (for the backbone), before any CLIP weights load.
    """

    #: The method's identity in prompt files and checkpoints (its ``METHODS`` entry's ``prompt_identity``).
    method_name: ClassVar[str]
    #: What the method can learn from; subclasses keep it.
    learning_types: ClassVar[tuple[Learning, ...]]
    #: How the method learns its prompts (:mod:`~anomalib_faprompt.models.training_rules`).
    training_rule: ClassVar[TrainingRule]
    #: Epochs of a fit when neither the model's ``max_epochs`` nor the trainer's is set (the release's).
    default_max_epochs: ClassVar[int] = 15

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a method class that anomalib's ``get_model("<Name>")`` would not find."""
        super().__init_subclass__(**kwargs)
        if "method_name" in cls.__dict__ and AnomalibModule not in cls.__bases__:
            msg = (
                f"{cls.__name__}: list AnomalibModule among its direct bases, e.g. class {cls.__name__}"
                f"({cls.__bases__[0].__name__}, AnomalibModule): anomalib's get_model('{cls.__name__}') looks among "
                "AnomalibModule's direct subclasses only."
            )
            raise TypeError(msg)

    prompt_weights = Setting()
    allow_untrained_prompts = Setting()
    allow_setting_mismatch = Setting()
    max_epochs = Setting()
    k_shot = Setting()
    few_shot_source = Setting()
    reference_seed = Setting()
    normal_fpr = Setting()
    normal_images = Setting()

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 518,
        prompt_weights: str | Path | None = None,
        allow_untrained_prompts: bool = False,
        allow_setting_mismatch: bool = False,
        max_epochs: int | None = None,
        k_shot: int = 0,
        few_shot_source: str | Path | None = None,
        reference_seed: int = 0,
        inference_compile: str | None = None,
        normal_fpr: float | None = None,
        normal_images: str | Path | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        settings = SharedSettings.checked(
            backbone=backbone, pretrained=pretrained, image_size=image_size, prompt_weights=prompt_weights,
            allow_untrained_prompts=allow_untrained_prompts, allow_setting_mismatch=allow_setting_mismatch,
            max_epochs=max_epochs, k_shot=k_shot, few_shot_source=few_shot_source, reference_seed=reference_seed,
            inference_compile=inference_compile, normal_fpr=normal_fpr, normal_images=normal_images,
        )  # fmt: skip
        chosen_post_processor = normal_fpr_post_processor(settings, post_processor)
        # The checked values are what hparams record (Lightning reads them from this frame).
        k_shot, few_shot_source, reference_seed = settings.k_shot, settings.few_shot_source, settings.reference_seed
        max_epochs, inference_compile = settings.max_epochs, settings.inference_compile
        normal_fpr, normal_images = settings.normal_fpr, settings.normal_images
        # The pre-processor needs the image size, which the torch model checks against the backbone: made after it.
        default_pre_processor = pre_processor is True
        super().__init__(pre_processor=False if default_pre_processor else pre_processor,
                         post_processor=chosen_post_processor, evaluator=evaluator, visualizer=visualizer)  # fmt: skip
        self.settings = settings
        if evaluator is True and settings.normal_fpr is not None:
            self.evaluator = self.configure_evaluator(rates=True)  # the rates at the threshold from normal images
        self._plain_hparams()
        self.model = self.build_model()
        if default_pre_processor:
            self.pre_processor = self.configure_pre_processor(self.model.image_size)
        self.model.compile_inference(settings.inference_compile)
        if not any(True for _ in self.model.learnable_parameters()):
            self.model.prompts_ready.fill_(True)  # fixed prompts: nothing to learn
        self.reference_files: list[str] = []
        self._unwatch_optimizer_steps()
        self.load_initial_prompts(settings.prompt_weights)
        self.use_output_scale_thresholds()

    def build_model(self) -> PromptedCLIP:
        """The method's torch model, built from ``self.hparams`` (its own settings and the shared ones)."""
        raise NotImplementedError

    def _plain_hparams(self) -> None:
        # Checkpoints are read with weights_only=True, which refuses OmegaConf containers (YAML configs pass lists as
        # ListConfig) and anything but plain Python. Files by absolute path: a checkpoint rebuilds its model
        # (load_from_checkpoint, the CLI's --ckpt_path) from any working directory.
        self.hparams.update(plain_data(dict(self.hparams)))
        for name in ("backbone", "pretrained", "prompt_weights"):
            value = self.hparams.get(name)
            if isinstance(value, str) and Path(value).is_file():
                self.hparams[name] = str(Path(value).resolve())

    @property
    def learning_type(self) -> LearningType:
        """What the model does, for anomalib's engine.

        ``ZERO_SHOT`` with loaded prompts, ``FEW_SHOT`` with loaded prompts and ``k_shot`` references (the engine
        skips fitting for both), otherwise the training rule's type (fitting learns the prompts).
        """
        if self.settings.prompt_weights is None:
            return self.training_rule.learning_type
        return LearningType.FEW_SHOT if self.settings.k_shot else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (prompts are untrained before the first step); the rule's; ``max_epochs`` when set."""
        arguments: dict[str, Any] = {"num_sanity_val_steps": 0, **self.training_rule.trainer_arguments}
        if self.settings.max_epochs is not None:
            arguments["max_epochs"] = self.settings.max_epochs
        return arguments

    # Training: the rule's ------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The training rule's optimisers."""
        return self.training_rule.configure_optimizers(self)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One step of the training rule."""
        del args, kwargs
        return self.training_rule.training_step(self, batch)

    def on_fit_start(self) -> None:
        """Check the training data's files, the epochs, then what the rule checks and prepares."""
        super().on_fit_start()
        validate_trainer_data(self.trainer, "fit")
        self._default_epochs()
        self.training_rule.on_fit_start(self)

    def on_fit_end(self) -> None:
        """What the rule drops after a fit."""
        super().on_fit_end()
        self.training_rule.on_fit_end(self)

    def _default_epochs(self) -> None:
        """Learn for :attr:`default_max_epochs` when neither the model nor the trainer set the epochs.

        Lightning then runs 1000 epochs (its default for an unset ``max_epochs`` and ``max_steps``), e.g. for
        ``Engine().fit(model, datamodule=...)``; the released training has the method's own number.
        """
        trainer = self.trainer
        unset = self.settings.max_epochs is None and trainer.max_steps == -1
        if not unset or trainer.fit_loop.max_epochs != LIGHTNING_DEFAULT_MAX_EPOCHS:
            return
        trainer.fit_loop.max_epochs = self.default_max_epochs
        logger.info(
            "%s: max_epochs was not set (model or trainer): learning for the method's default %d epochs instead of "
            "Lightning's %d. Set max_epochs (model, Engine or --trainer.max_epochs) to choose.",
            self.method_name,
            self.default_max_epochs,
            LIGHTNING_DEFAULT_MAX_EPOCHS,
        )

    # Stages ----------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Refuse anomalous images without masks (Lightning calls this before it sets the datamodule up)."""
        super().prepare_data()
        check_masks_before_setup(getattr(self.trainer, "datamodule", None))

    def on_validation_start(self) -> None:
        """Validation outside of fitting needs usable prompts and the references."""
        super().on_validation_start()
        if self.trainer.state.fn != "fit":
            self.check_prompts_ready("validate")
            self.references_before_scoring()
        validate_trainer_data(self.trainer, "validate")

    def on_test_start(self) -> None:
        """Testing needs usable prompts and the references."""
        super().on_test_start()
        self.check_prompts_ready("test")
        self.references_before_scoring()
        validate_trainer_data(self.trainer, "test")

    def on_predict_start(self) -> None:
        """Prediction needs usable prompts and the references."""
        super().on_predict_start()
        self.check_prompts_ready("predict")
        self.references_before_scoring()
        validate_trainer_data(self.trainer, "predict")

    def on_predict_end(self) -> None:
        """Say where the visualiser wrote the images (``anomalib predict`` would not say otherwise)."""
        super().on_predict_end()
        folder = getattr(self.visualizer, "output_dir", None)
        if folder is not None and self.trainer.is_global_zero:
            # Resolved: anomalib's results folders go through a ``latest`` link that the next run moves.
            logger.info("%s: visualisations of the predicted images written under %s", self.name,
                        Path(folder).resolve())  # fmt: skip

    def val_dataloader(self) -> list:
        """No validation data of the model's own.

        Lightning asks the model when it was given neither a datamodule nor dataloaders, as anomalib's
        ``Engine.predict(model, data_path=...)`` does to calibrate a zero-shot model (loaded prompts) before
        predicting: there is then nothing to calibrate on, and prediction goes on with default thresholds.
        """
        return []
