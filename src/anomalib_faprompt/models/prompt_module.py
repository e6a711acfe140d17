"""Behaviour shared by the Lightning modules of the prompt-learning methods.

Both AnomalyCLIP and FAPrompt learn prompts on *anomalous* samples with masks (an auxiliary
dataset, in the zero-shot protocol) and refuse to score images with prompts that were neither
trained nor loaded. This mixin holds that logic, the release's pre-processing and optimiser,
and the default evaluator; each method's module stays a direct ``AnomalibModule`` subclass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator, F1Score
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.components.metrics import RawOutputEvaluator, paper_metrics
from anomalib_faprompt.data.validation import validate_trainer_data
from anomalib_faprompt.prompt_weights import load_prompt_weights, save_prompt_weights

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

ZERO_SHOT_PROTOCOL = (
    "Zero-shot prompt learning needs anomalous training samples with masks: prompts are learned once on an "
    "auxiliary labelled dataset (e.g. the test split of all MVTec AD categories) and then applied unchanged to "
    "other datasets. Train on such data (anomalib_faprompt.data.AuxiliaryDataModule, or a datamodule whose train "
    "split holds anomalous images with masks), or load learned prompts with prompt_weights=... and run "
    "`anomalib test` directly."
)


class UntrainedPromptsError(RuntimeError):
    """The model was asked to score images with prompts that were neither trained nor loaded."""


class PromptWeightsCheckpoint(Callback):
    """Write the learned prompts as a small ``prompts.pt`` next to each Lightning checkpoint."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the prompt file into the checkpoint callback's folder."""
        del checkpoint
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is not None and trainer.is_global_zero:
            pl_module.save_prompt_weights(Path(dirpath) / "prompts.pt")


class PromptLearningMixin:
    """Shared Lightning logic; the class using it sets ``self.model`` to a :class:`PromptedCLIP`."""

    model: PromptedCLIP
    method_name: str

    def _init_prompts(
        self, prompt_weights: str | Path | None, allow_untrained_prompts: bool, max_epochs: int | None
    ) -> None:
        self.prompt_weights = prompt_weights
        self.max_epochs = max_epochs
        self.allow_untrained_prompts = allow_untrained_prompts
        if prompt_weights is not None:
            load_prompt_weights(self.model, prompt_weights, self.method_name)
        self._default_thresholds()

    def _default_thresholds(self) -> None:
        """Give the post-processor the scale of the outputs until validation data calibrates it.

        Scores are anomaly probabilities in [0, 1]; maps add one probability per feature layer, in
        [0, L]. Without statistics anomalib's post-processor passes them through unthresholded (labels
        and masks would be the raw values), as when predicting on a folder or exporting a model whose
        prompts were loaded. With these ranges scores stay as they are, maps become the mean per-layer
        probability, and both are labelled anomalous above 0.5. Validation replaces them (anomalib
        validates a zero-shot model before testing it).
        """
        post_processor = self.post_processor
        if not isinstance(post_processor, PostProcessor):
            return
        map_scale = float(len(self.model.feature_layers))
        defaults = {
            "_image_threshold": 0.5,
            "image_min": 0.0,
            "image_max": 1.0,
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

    @property
    def learning_type(self) -> LearningType:
        """``ZERO_SHOT`` with loaded prompts (the engine skips fitting), otherwise ``ONE_CLASS``.

        anomalib has no learning type for training on labelled anomalies; ``ONE_CLASS`` is the one
        for which the engine runs the fitting loop. The train split is checked to hold anomalies.
        """
        return LearningType.ZERO_SHOT if self.prompt_weights is not None else LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (prompts are untrained before the first step); ``max_epochs`` when set."""
        arguments: dict[str, Any] = {"num_sanity_val_steps": 0}
        if self.max_epochs is not None:
            arguments["max_epochs"] = self.max_epochs
        return arguments

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the learnable parameters only, with the release's settings."""
        return torch.optim.Adam(self.model.learnable_parameters(), lr=self.learning_rate, betas=tuple(self.betas))

    # Guards ---------------------------------------------------------------------------------------------------

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

    def _check_prompts_ready(self, stage: str) -> None:
        if not bool(self.model.prompts_ready) and not self.allow_untrained_prompts:
            msg = (
                f"{self.method_name} cannot {stage}: its prompts were neither trained nor loaded, so its scores would "
                f"be meaningless. Train it first, pass prompt_weights=/path/to/prompts (CLI: --model.prompt_weights), "
                f"or set allow_untrained_prompts=True for experiments."
            )
            raise UntrainedPromptsError(msg)

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's component callbacks, raw-output metrics before the post-processor, and the prompt-file writer.

        An evaluator given by the user (or set later, as pipelines do) gets the same treatment as the default one:
        its threshold-free metrics are computed on raw outputs, so every path reports the same numbers.
        """
        if isinstance(self.evaluator, Evaluator):
            self.evaluator = RawOutputEvaluator.from_evaluator(self.evaluator)
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if isinstance(self.evaluator, RawOutputEvaluator):
            position = next((i for i, callback in enumerate(callbacks) if callback is self.post_processor), 0)
            callbacks.insert(position, self.evaluator.before_post_processing)
        return [*callbacks, PromptWeightsCheckpoint()]

    def on_fit_start(self) -> None:
        """Refuse one-class train splits before any work is done."""
        self._check_train_split()
        validate_trainer_data(self.trainer, "fit")

    def on_validation_start(self) -> None:
        """Validation outside of fitting needs usable prompts."""
        if self.trainer.state.fn != "fit":
            self._check_prompts_ready("validate")
        validate_trainer_data(self.trainer, "validate")

    def on_test_start(self) -> None:
        """Testing needs usable prompts."""
        self._check_prompts_ready("test")
        validate_trainer_data(self.trainer, "test")

    def on_predict_start(self) -> None:
        """Prediction needs usable prompts."""
        self._check_prompts_ready("predict")
        validate_trainer_data(self.trainer, "predict")

    def val_dataloader(self) -> list:
        """No validation data of the model's own.

        Lightning asks the model when it was given neither a datamodule nor dataloaders, as anomalib's
        ``Engine.predict(model, data_path=...)`` does to calibrate a zero-shot model (loaded prompts) before
        predicting: there is then nothing to calibrate on, and prediction goes on with default thresholds.
        """
        return []

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

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """After the first update the prompts count as trained."""
        del args, kwargs
        self.model.prompts_ready.fill_(True)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One prompt-learning step on labelled images with masks (the method's ``training_losses``)."""
        del args, kwargs
        masks, labels = self._training_targets(batch)
        losses = self.training_losses(batch.image, masks, labels)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(labels))
        return losses

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the validation batch (anomalib uses it for thresholds and normalisation)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def save_prompt_weights(self, path: str | Path) -> Path:
        """Write the learned prompts to a small file loadable with ``prompt_weights=``."""
        settings = {k: v for k, v in self.hparams.items() if k not in {"prompt_weights", "allow_untrained_prompts"}}
        return save_prompt_weights(self.model, path, self.method_name, settings)

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

        Example:
            >>> model = FAPrompt(prompt_weights="FAPrompt_mvtec.pth")  # doctest: +SKIP
            >>> model.to_openvino("exports")  # doctest: +SKIP
            PosixPath('exports/weights/openvino/model.xml')

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
