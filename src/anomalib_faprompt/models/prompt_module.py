"""The prompt lifecycle every prompt method's Lightning module shares.

:class:`PromptLifecycleMixin` loads, saves and checks prompts (trained or loaded, finite, learned with the same
settings and CLIP), collects few-shot references, scores batches, configures anomalib's components and exports.
How prompts are *learned* is a separate training rule the method opts into (:mod:`.training_rules`); each
method's module stays a direct ``AnomalibModule`` subclass::

    class FAPrompt(PromptLifecycleMixin, MaskSupervisedPromptLearning, AnomalibModule): ...
"""

from __future__ import annotations

import logging
from abc import ABC
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator, F1Score
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_faprompt.callbacks import MODEL_CREATED, hand_over_callbacks
from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.clip.settings import check_int
from anomalib_faprompt.components.metrics import RawOutputEvaluator, paper_metrics
from anomalib_faprompt.data.references import sample_normal_references
from anomalib_faprompt.data.validation import check_masks_before_setup, validate_trainer_data
from anomalib_faprompt.distributed import DistributedSampling, SharedWorkspace
from anomalib_faprompt.logs import quiet_export
from anomalib_faprompt.methods import RUN_TIME_SETTINGS
from anomalib_faprompt.models.training_rules import ZERO_SHOT_PROTOCOL
from anomalib_faprompt.prompt_weights import (
    NonFiniteValuesError,
    check_checkpoint_method,
    check_finite,
    check_settings,
    clip_identity,
    hyper_parameter_settings,
    load_prompt_weights,
    plain_data,
    save_prompt_weights,
)
from anomalib_faprompt.visualization import HeatMapVisualizer

if TYPE_CHECKING:
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from anomalib.deploy import CompressionType
    from torchmetrics import Metric

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ONNX opset of exports. The dynamo exporter emits opset 18; anomalib's default (14) needs a down-conversion
#: that fails on this graph (ReduceMean/Split axes) and leaves the model at 18 after a long warning anyway.
ONNX_OPSET = 18

__all__ = ["ZERO_SHOT_PROTOCOL", "PromptLearningMixin", "PromptLifecycleMixin", "UntrainedPromptsError"]


#: Settings prompts depend on beyond the method and the CLIP (:func:`clip_identity`): recorded in prompt files
#: and checkpoints and compared when they load. Training settings (learning rate, epochs) and ``sigma``
#: (smoothing after the prompts, not seen by training) are not among them.
PROMPT_SETTINGS = (
    "image_size",
    "feature_layers",
    "dpam_layers",
    "text_depth",
    "text_n_ctx",
    "n_ctx",
    "n_ctx_normal",
    "n_ctx_abnormal",
    "n_abnormal_prompts",
    "n_prior_patches",
)


def check_references(
    k_shot: int, few_shot_source: str | Path | None, reference_seed: int
) -> tuple[int, Path | None, int]:
    """Check the few-shot reference settings (called first thing by the methods' constructors).

    Raises:
        ValueError: For a negative or non-integer ``k_shot`` or ``reference_seed``.
        FileNotFoundError: For a ``few_shot_source`` that does not exist.
    """
    k_shot = check_int("k_shot", k_shot, 0, why="normal reference images; 0 is zero-shot")
    reference_seed = check_int("reference_seed", reference_seed, 0, why="of the sampling of the references")
    source = Path(few_shot_source) if few_shot_source not in {None, ""} else None
    if source is not None and not source.exists():
        msg = f"few_shot_source '{source}' does not exist (a normal reference image, or a folder of them)."
        raise FileNotFoundError(msg)
    return k_shot, source, reference_seed


class UntrainedPromptsError(RuntimeError):
    """The model was asked to score images with prompts that were neither trained nor loaded."""


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


class PromptLifecycleMixin(ABC):
    """The prompt lifecycle of a prompt method's Lightning module.

    The method sets :attr:`method_name` (its identity in prompt files and checkpoints) and ``self.model`` (a
    :class:`PromptedCLIP`), then calls :meth:`_init_prompts` at the end of ``__init__``. Its training rule
    (:mod:`.training_rules`) provides ``training_step``, ``configure_optimizers`` and
    ``training_learning_type``. Every Lightning hook here calls ``super()``, so rules and anomalib's mixins
    keep theirs.
    """

    model: PromptedCLIP
    method_name: ClassVar[str]
    training_learning_type: ClassVar[LearningType]
    #: The settings the prompts depend on (recorded and compared, :meth:`prompt_settings`); a method adds its own.
    prompt_setting_names: ClassVar[tuple[str, ...]] = PROMPT_SETTINGS

    def _init_prompts(
        self,
        prompt_weights: str | Path | None,
        allow_untrained_prompts: bool,
        max_epochs: int | None,
        allow_setting_mismatch: bool = False,
        k_shot: int = 0,
        few_shot_source: str | Path | None = None,
        reference_seed: int = 0,
        inference_compile: str | None = None,
    ) -> None:
        # Checkpoints are read with weights_only=True, which refuses OmegaConf containers (YAML configs pass
        # lists as ListConfig) and anything but plain Python: store plain values so every path can reload them.
        self.hparams.update(plain_data(dict(self.hparams)))
        # Files by absolute path: a checkpoint rebuilds its model (load_from_checkpoint, the CLI's --ckpt_path)
        # from any working directory.
        for name in ("backbone", "pretrained", "prompt_weights"):
            value = self.hparams.get(name)
            if isinstance(value, str) and Path(value).is_file():
                self.hparams[name] = str(Path(value).resolve())
        self.prompt_weights = prompt_weights
        self.max_epochs = max_epochs
        self.allow_untrained_prompts = allow_untrained_prompts
        self.allow_setting_mismatch = allow_setting_mismatch
        self.k_shot, self.few_shot_source, self.reference_seed = check_references(
            k_shot, few_shot_source, reference_seed
        )
        self.model.compile_inference(inference_compile)
        #: The image files of the references in the visual memory, once collected (in sampling order).
        self.reference_files: list[str] = []
        self._clip_identity = clip_identity(self.hparams["backbone"], self.hparams["pretrained"])
        self._step_hooks: list[Any] = []
        self._initial_prompts: dict[str, torch.Tensor] | None = None
        #: The settings the loaded prompt file records (``None`` without one, or when it records none).
        self.loaded_prompt_settings: dict[str, Any] | None = None
        if prompt_weights is not None:
            loaded = load_prompt_weights(
                self.model,
                prompt_weights,
                self.method_name,
                self.prompt_settings(),
                allow_setting_mismatch=allow_setting_mismatch,
            )
            self.loaded_prompt_settings = loaded.settings
            if not loaded.trained and not allow_untrained_prompts:
                msg = (
                    f"'{prompt_weights}' holds untrained prompts (saved from a model that made no optimiser step, "
                    "with allow_untrained_prompts=True); their scores would be meaningless. Load trained prompts, "
                    "or pass allow_untrained_prompts=True for experiments."
                )
                raise UntrainedPromptsError(msg)
        self._default_thresholds()

    def prompt_settings(self) -> dict[str, Any]:
        """The settings the prompts depend on: method, CLIP identity and :data:`PROMPT_SETTINGS`.

        Recorded in prompt files and Lightning checkpoints; loading prompts recorded with other values
        is refused unless the model was built with ``allow_setting_mismatch=True``.
        """
        return {
            "method": self.method_name,
            **self._clip_identity,
            **hyper_parameter_settings(self.hparams, self.prompt_setting_names),
        }

    def _default_thresholds(self) -> None:
        """Give the post-processor the scale of the outputs until validation data calibrates it.

        Scores lie in [0, s] and maps in [0, s · L] for L feature layers, with ``s`` the model's
        ``output_scale`` (1 for anomaly probabilities; ½ for PromptAD's half harmonic means). Without
        statistics anomalib's post-processor passes them through unthresholded (labels and masks would be the
        raw values), as when predicting on a folder or exporting a model whose prompts were loaded. With these
        ranges scores and maps are normalised to [0, 1] and labelled anomalous above half their range.
        Validation replaces them (anomalib validates a zero-shot model before testing it).
        """
        post_processor = self.post_processor
        if not isinstance(post_processor, PostProcessor):
            return
        score_scale = float(getattr(self.model, "output_scale", 1.0))
        map_scale = score_scale * len(self.model.feature_layers)
        defaults = {
            "_image_threshold": 0.5 * score_scale,
            "image_min": 0.0,
            "image_max": score_scale,
            "_pixel_threshold": 0.5 * map_scale,
            "pixel_min": 0.0,
            "pixel_max": map_scale,
        }
        if all(torch.isnan(getattr(post_processor, name)).all() for name in defaults):
            for name, value in defaults.items():
                getattr(post_processor, name).fill_(value)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Resize (bicubic) to the model's input size and normalise with CLIP's mean and std.

        Masks are resized alongside the images by anomalib's pre-processor.
        """
        image_size = image_size or 518
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        transform = Compose(
            [
                Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            ]
        )
        return PreProcessor(transform=transform)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's default post-processor (adaptive thresholds and min-max normalisation)."""
        return PostProcessor()

    @staticmethod
    def configure_evaluator() -> RawOutputEvaluator:
        """The papers' metrics (image AUROC and AP, pixel AUROC and AUPRO) on raw outputs, and image F1.

        Threshold-free metrics see the raw scores and maps, as in the ``zero_shot`` table (see
        :class:`~anomalib_faprompt.components.metrics.RawOutputEvaluator`); F1 needs the post-processor's labels.
        Pixel metrics are skipped for data without masks.
        """
        return RawOutputEvaluator(
            test_metrics=[*paper_metrics(strict=False), F1Score(fields=["pred_label", "gt_label"], prefix="image_")]
        )

    @staticmethod
    def configure_visualizer() -> HeatMapVisualizer:
        """Heat-maps with titled, distinct panels and, for untrained CLIP weights, a notice below them.

        The panels are Image, Gt Mask, Pred Mask and Image + Anomaly Map, those the data and the model give; the
        notice names e.g. the random small CLIP (see :mod:`anomalib_faprompt.visualization`).
        """
        return HeatMapVisualizer()

    @property
    def learning_type(self) -> LearningType:
        """What the model does, for anomalib's engine.

        ``ZERO_SHOT`` with loaded prompts, ``FEW_SHOT`` with loaded prompts and ``k_shot`` references (the
        engine skips fitting for both), otherwise the training rule's type (fitting learns the prompts).
        """
        if self.prompt_weights is None:
            return self.training_learning_type
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (prompts are untrained before the first step); ``max_epochs`` when set."""
        arguments: dict[str, Any] = {
            "num_sanity_val_steps": 0,
            # What the training rule needs of the trainer (e.g. one step per epoch).
            **getattr(self, "training_trainer_arguments", {}),
        }
        if self.max_epochs is not None:
            arguments["max_epochs"] = self.max_epochs
        return arguments

    # Guards ---------------------------------------------------------------------------------------------------

    def _check_prompts_ready(self, stage: str) -> None:
        if not bool(self.model.prompts_ready) and not self.allow_untrained_prompts:
            last_fit = getattr(self, "_last_fit", None)
            cause = (
                f" The last fit made {last_fit['steps']} optimiser steps (max_epochs={last_fit['max_epochs']}) and "
                "none changed the prompts: train for at least one epoch on data with anomalous images and masks."
                if last_fit is not None
                else ""
            )
            msg = (
                f"{self.method_name} cannot {stage}: its prompts were neither trained nor loaded, so its scores would "
                f"be meaningless.{cause} Train it first, pass prompt_weights=/path/to/prompts (CLI: "
                f"--model.prompt_weights), or set allow_untrained_prompts=True for experiments."
            )
            raise UntrainedPromptsError(msg)

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's component callbacks, raw-output metrics before the post-processor, and the prompt-file writer.

        With them, the samplers and the shared folder that make a distributed run give one process's results
        (:mod:`~anomalib_faprompt.distributed`).

        An evaluator given by the user (or set later, as pipelines do) gets the same treatment as the default one:
        its threshold-free metrics are computed on raw outputs, so every path reports the same numbers. The
        trainer's default progress bar becomes one that names the model, dataset and category
        (:func:`~anomalib_faprompt.callbacks.hand_over_callbacks`).
        """
        if isinstance(self.evaluator, Evaluator):
            self.evaluator = RawOutputEvaluator.from_evaluator(self.evaluator)
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if isinstance(self.evaluator, RawOutputEvaluator):
            position = next((i for i, callback in enumerate(callbacks) if callback is self.post_processor), 0)
            callbacks.insert(position, self.evaluator.before_post_processing)
        own = [PromptWeightsCheckpoint(), DistributedSampling(), SharedWorkspace()]
        for callback in own:
            setattr(callback, MODEL_CREATED, True)
        return hand_over_callbacks(self, [*callbacks, *own])

    def prepare_data(self) -> None:
        """Refuse anomalous images without masks (Lightning calls this before it sets the datamodule up)."""
        super().prepare_data()
        check_masks_before_setup(getattr(self.trainer, "datamodule", None))

    def _references_before_scoring(self) -> None:
        """Collect the ``k_shot`` normal references at the start of validate, test and predict.

        Not in ``setup``: Lightning restores a ``ckpt_path`` after ``setup`` and before these hooks, and a
        checkpoint's memory is what scores where no train split or source is available (a folder to predict).
        """
        if self.k_shot:
            self._collect_references()

    def _collect_references(self) -> torch.Tensor | None:
        """Fill the visual memory with ``k_shot`` normal images, pre-processed as test images; returns them.

        From ``few_shot_source`` (the first ``k_shot`` images of the folder, sorted by name) when given, otherwise
        sampled with ``reference_seed`` from the normal images of the datamodule's train split (the target's, for
        :class:`~anomalib_faprompt.data.AuxiliaryDataModule`) by
        :func:`~anomalib_faprompt.data.references.sample_normal_references`, the sampling the ``zero_shot``
        pipeline gives its baselines too. A memory that came with a checkpoint or prompt file is kept only when
        neither is available (predicting on a folder). :attr:`reference_files` names the images used.

        Returns:
            The pre-processed references (k, 3, H, W), or ``None`` when the stored memory was kept.

        Raises:
            ValueError: If fewer than ``k_shot`` normal images are available, naming where they were looked for.
        """
        images, source = self._reference_images()
        if images is None:
            if self.model.references.is_empty:
                msg = (
                    f"{self.method_name}: k_shot={self.k_shot} needs normal reference images, but there is no train "
                    "split to sample them from and no stored memory. Pass few_shot_source=/folder/of/normal/images "
                    "(CLI: --model.few_shot_source), or use a datamodule with a train split."
                )
                raise ValueError(msg)
            return None
        if len(images) < self.k_shot:
            msg = (
                f"{self.method_name}: k_shot={self.k_shot} but {source} holds only {len(images)} normal image(s). "
                f"Lower k_shot to at most {len(images)} or add normal images."
            )
            raise ValueError(msg)
        images = images[: self.k_shot]
        files = [str(item.image_path) for item in images]
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        batch = torch.stack([transform(item.image) if transform is not None else item.image for item in images])
        if files == self.reference_files and not self.model.references.is_empty:
            return batch  # already in the memory: Engine.test validates, then tests, each stage starting
        self.model.references.reset()
        self.model.add_references(batch.to(self.device))
        self.reference_files = files
        logger.info(
            "%s: %d normal reference image(s) from %s in the visual memory (%.1f MB)",
            self.method_name,
            self.k_shot,
            source,
            self.model.references.nbytes / 2**20,
        )
        return batch

    def _reference_images(self) -> tuple[list[Any] | None, str]:
        """Candidate normal images (dataset items, un-pre-processed, in sampling order) and where they come from."""
        if self.few_shot_source is not None:
            from anomalib.data import PredictDataset

            dataset = PredictDataset(self.few_shot_source)
            return [dataset[index] for index in range(len(dataset))], f"few_shot_source '{self.few_shot_source}'"
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        datamodule = getattr(datamodule, "target", datamodule)  # AuxiliaryDataModule: the target's normal images
        dataset = getattr(datamodule, "train_data", None)
        samples = getattr(dataset, "samples", None)
        if samples is None:
            return None, ""
        order = sample_normal_references(samples, self.k_shot, self.reference_seed)
        name = f"the train split of {getattr(datamodule, 'name', type(datamodule).__name__)}"
        category = getattr(datamodule, "category", None)
        return [dataset[index] for index in order], name + (f"/{category}" if category else "")

    def on_fit_start(self) -> None:
        """Check the training data's files before any work is done."""
        super().on_fit_start()
        validate_trainer_data(self.trainer, "fit")

    def on_fit_end(self) -> None:
        """Remember what the fit did, to explain untrained prompts (e.g. ``--trainer.max_epochs 0``) later."""
        super().on_fit_end()
        self._last_fit = {"steps": self.trainer.global_step, "max_epochs": self.trainer.max_epochs}

    def on_validation_start(self) -> None:
        """Validation outside of fitting needs usable prompts."""
        super().on_validation_start()
        if self.trainer.state.fn != "fit":
            self._check_prompts_ready("validate")
            self._references_before_scoring()
        validate_trainer_data(self.trainer, "validate")

    def on_test_start(self) -> None:
        """Testing needs usable prompts."""
        super().on_test_start()
        self._check_prompts_ready("test")
        self._references_before_scoring()
        validate_trainer_data(self.trainer, "test")

    def on_predict_start(self) -> None:
        """Prediction needs usable prompts."""
        super().on_predict_start()
        self._check_prompts_ready("predict")
        self._references_before_scoring()
        validate_trainer_data(self.trainer, "predict")

    def on_predict_end(self) -> None:
        """Say where the visualiser wrote the images (``anomalib predict`` would not say otherwise)."""
        super().on_predict_end()
        folder = getattr(self.visualizer, "output_dir", None)
        if folder is not None and self.trainer.is_global_zero:
            # Resolved: anomalib's results folders go through a ``latest`` link that the next run moves.
            folder = Path(folder).resolve()
            logger.info("%s: visualisations of the predicted images written under %s", self.name, folder)

    def val_dataloader(self) -> list:
        """No validation data of the model's own.

        Lightning asks the model when it was given neither a datamodule nor dataloaders, as anomalib's
        ``Engine.predict(model, data_path=...)`` does to calibrate a zero-shot model (loaded prompts) before
        predicting: there is then nothing to calibrate on, and prediction goes on with default thresholds.
        """
        return []

    # Trained means: an optimiser step changed the prompts ----------------------------------------------------

    def on_train_start(self) -> None:
        """Watch the optimisers' steps: the prompts count as trained once a step has changed them."""
        super().on_train_start()
        self._watch_optimizer_steps(self.trainer.optimizers)

    def on_train_end(self) -> None:
        """Stop watching the optimisers."""
        super().on_train_end()
        self._unwatch_optimizer_steps()

    def _watch_optimizer_steps(self, optimizers: list[torch.optim.Optimizer]) -> None:
        # Why a post-step hook on the torch optimiser and a comparison with the initial values: a training batch
        # is not an update. Gradient accumulation steps every few batches, AMP's GradScaler skips
        # optimizer.step() when a gradient is inf/NaN, manual optimisation steps where it chooses, and a step
        # whose parameters have no gradient changes nothing. The hook runs only after a real optimizer.step(),
        # whoever calls it, and the comparison makes sure that step changed the learned values.
        self._unwatch_optimizer_steps()
        if bool(self.model.prompts_ready):
            return
        self._initial_prompts = self.model.prompt_state_dict()
        self._step_hooks = [optimizer.register_step_post_hook(self._after_optimizer_step) for optimizer in optimizers]

    def _unwatch_optimizer_steps(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks, self._initial_prompts = [], None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        del optimizer, args, kwargs
        initial = self._initial_prompts
        if initial is None:
            return
        current = dict(self.model.named_parameters())
        if any(not torch.equal(current[name].detach(), value) for name, value in initial.items()):
            self.model.prompts_ready.fill_(True)
            self._unwatch_optimizer_steps()

    # Scoring: non-finite values raise instead of being scored -------------------------------------------------

    def _describe_images(self, batch: Batch, indices: list[int]) -> str:
        paths = getattr(batch, "image_path", None)
        if paths is not None and len(paths) == len(batch.image):
            return ", ".join(str(paths[index]) for index in indices)
        return f"images {indices} of the batch (no file paths)"

    def _check_finite_input(self, batch: Batch, stage: str, finite: torch.Tensor | None = None) -> None:
        if finite is None:
            finite = torch.isfinite(batch.image).flatten(1).all(dim=1)
        if bool(finite.all()):
            return
        bad = torch.nonzero(~finite).flatten().tolist()
        msg = (
            f"{self.method_name} cannot {stage}: {len(bad)} input image(s) hold non-finite values (NaN or inf) after "
            f"pre-processing: {self._describe_images(batch, bad)}. Their scores would be NaN, which anomalib's "
            "post-processor labels normal. Check these files and the transforms of the pre-processor and dataset."
        )
        raise NonFiniteValuesError(msg)

    def _check_finite_output(self, batch: Batch, predictions: Any, stage: str, finite: torch.Tensor) -> None:
        if bool(finite.all()):
            return
        bad = torch.nonzero(~finite).flatten().tolist()
        prompts = [
            name for name, value in self.model.prompt_state_dict().items() if not bool(torch.isfinite(value).all())
        ]
        cause = (
            f"The prompts hold non-finite values ({', '.join(prompts)}): training diverged or they were altered."
            if prompts
            else "The prompts are finite; the model overflowed (e.g. under reduced precision)."
        )
        msg = (
            f"{self.method_name} cannot {stage}: non-finite outputs (NaN or inf scores or maps) for {len(bad)} "
            f"image(s) with finite inputs: {self._describe_images(batch, bad)}. {cause}"
        )
        raise NonFiniteValuesError(msg)

    def _score(self, batch: Batch, stage: str) -> Batch:
        """Score ``batch`` after checking that its images, and then the scores and maps, are finite.

        The checks run here, in the Lightning steps, not in the torch model's ``forward``: ``torch.export``
        cannot trace a Python ``if`` on tensor values. An exported model (``to_torch``/``to_onnx``/
        ``to_openvino``) does not check: a NaN or infinite pixel gives a NaN score and NaN map values, and the
        post-processing in the exported graph labels them normal (a comparison with NaN is false). Check inputs
        before inference there (e.g. ``np.isfinite(image).all()``).

        Raises:
            NonFiniteValuesError: Naming the batch's image files (when known) with non-finite inputs or outputs.
        """
        # One host synchronisation per batch, after the forward is queued: checking the input before it would stall
        # an accelerator's queue on every batch. The input's verdict still comes first, and also when the forward
        # fails on the non-finite values.
        input_finite = torch.isfinite(batch.image).flatten(1).all(dim=1)
        try:
            predictions = self.model(batch.image)
        except Exception:
            self._check_finite_input(batch, stage, input_finite)
            raise
        outputs = [predictions.pred_score.reshape(len(batch.image), -1), predictions.anomaly_map.flatten(1)]
        output_finite = torch.cat([torch.isfinite(output) for output in outputs], dim=1).all(dim=1)
        if not bool((input_finite & output_finite).all()):
            self._check_finite_input(batch, stage, input_finite)
            self._check_finite_output(batch, predictions, stage, output_finite)
        return batch.update(**predictions._asdict())

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the validation batch (anomalib uses it for thresholds and normalisation)."""
        del args, kwargs
        return self._score(batch, "validate")

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the test batch; non-finite inputs or outputs raise (see :meth:`_score`)."""
        del args, kwargs
        return self._score(batch, "test")

    def predict_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the batch to predict; non-finite inputs or outputs raise (see :meth:`_score`)."""
        del args, kwargs
        return self._score(batch, "predict")

    # Prompt files and checkpoints -----------------------------------------------------------------------------

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
        settings = {k: v for k, v in self.hparams.items() if k not in RUN_TIME_SETTINGS}
        return save_prompt_weights(self.model, path, self.method_name, settings, self.prompt_settings(), trained)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store plain hyper-parameters and the settings the prompts depend on."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"] = plain_data(checkpoint.get("hyper_parameters", {}))
        checkpoint["prompt_settings"] = self.prompt_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints with non-finite learned values or learned with other settings.

        Raises:
            NonFiniteValuesError: If a learned value is NaN or infinite.
            SettingsMismatchError: If the checkpoint's settings differ from this model's (unless
                ``allow_setting_mismatch``); checkpoints without ``prompt_settings`` compare their
                ``hyper_parameters``.
        """
        super().on_load_checkpoint(checkpoint)
        learned = {key: value for key, value in checkpoint.get("state_dict", {}).items() if key.startswith("model.")}
        check_finite(learned, "(Lightning checkpoint)")
        check_checkpoint_method(checkpoint, self.method_name, "(Lightning checkpoint)")  # even with the override
        if not self.allow_setting_mismatch:
            current = self.prompt_settings()
            recorded = checkpoint.get("prompt_settings") or hyper_parameter_settings(
                checkpoint.get("hyper_parameters", {}), tuple(current)
            )
            check_settings(recorded, current, "(Lightning checkpoint)")

    # Export -------------------------------------------------------------------------------------------------

    def _prepare_export(self) -> None:
        """Refuse untrained prompts, then compute the text features the exported graph holds as constants.

        One eager forward in eval mode fills the model's text cache from the current parameters; while
        ``torch.export`` traces, :meth:`PromptedCLIP.cached` returns it, so the image-independent text
        encoder does not run in the exported model. FAPrompt's per-image DAP path (top-M patches, prior
        network, text encoder over the B x K shifted prompts) depends on the image and stays in the graph.
        """
        self._check_prompts_ready("export")
        self.eval()
        size = self.model.image_size
        with torch.no_grad():
            self.model(torch.zeros(1, 3, size, size, device=self.device))

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export the whole pipeline (pre-processing, model, post-processing) for ``TorchInferencer``.

        Example:
            >>> model = FAPrompt(prompt_weights="FAPrompt_mvtec.pth")  # doctest: +SKIP
            >>> model.to_torch("exports")  # doctest: +SKIP
            PosixPath('exports/weights/torch/model.pt')

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded.
        """
        self._prepare_export()
        return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (opset 18) with pre-processing inside and the static text features as constants.

        Without ``input_size`` the graph takes any image size (it resizes to ``image_size`` itself), as
        anomalib's inferencers need; the batch size is dynamic either way.

        Example:
            >>> model = AnomalyCLIP(prompt_weights="AnomalyCLIP_mvtec.pth")  # doctest: +SKIP
            >>> model.to_onnx("exports")  # doctest: +SKIP
            PosixPath('exports/weights/onnx/model.onnx')

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded.
        """
        self._prepare_export()
        kwargs.setdefault("opset_version", ONNX_OPSET)
        kwargs.setdefault("verbose", False)  # torch.onnx's step-by-step prints
        with quiet_export():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
        ov_kwargs: dict[str, Any] | None = None,
        onnx_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Export to OpenVINO IR through ONNX (see :meth:`to_onnx`); runs with ``OpenVINOInferencer``.

        The IR holds f32 weights, but the inference precision is chosen when the model is compiled: OpenVINO's
        CPU plugin infers in bf16 by default on CPUs with AVX512-BF16 or AMX (scores and maps then move by up to
        a few hundredths) and does not read a precision stored in the IR. Ask for f32 when compiling to get
        torch's outputs to ~1e-5, as the README's Deployment section shows.

        Example:
            >>> model = FAPrompt(prompt_weights="FAPrompt_mvtec.pth")  # doctest: +SKIP
            >>> model.to_openvino("exports")  # doctest: +SKIP
            PosixPath('exports/weights/openvino/model.xml')
            >>> from anomalib.deploy import OpenVINOInferencer
            >>> inferencer = OpenVINOInferencer(  # doctest: +SKIP
            ...     path="exports/weights/openvino/model.xml", device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
            ... )

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded.
        """
        self._check_prompts_ready("export")
        return super().to_openvino(
            export_root,
            model_file_name,
            input_size,
            compression_type=compression_type,
            datamodule=datamodule,
            metric=metric,
            task=task,
            max_drop=max_drop,
            ov_kwargs=ov_kwargs,
            onnx_kwargs={"opset_version": ONNX_OPSET, **(onnx_kwargs or {})},
        )


#: The name the lifecycle had before training rules were split out of it (``isinstance`` checks keep working).
PromptLearningMixin = PromptLifecycleMixin
