"""The anomalib components a prompt method configures, and the callbacks it hands to the trainer.

:class:`AnomalibParts`, a part of :class:`~anomalib_faprompt.models.base.PromptMethod`: CLIP's pre-processing (with
a resize that exports as it runs), anomalib's post-processor with thresholds on the outputs' own scale until
validation data calibrates them, the papers' metrics on raw outputs, heat-maps with titled panels, and the
callbacks that write prompt files, keep distributed runs equal to one process's and name the progress bars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomalib.metrics import Evaluator, F1Score
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback
from torch import nn

from anomalib_faprompt.callbacks import MODEL_CREATED, hand_over_callbacks
from anomalib_faprompt.compat import Thresholds, set_default_thresholds
from anomalib_faprompt.components.metrics import RawOutputEvaluator, paper_metrics, threshold_rates
from anomalib_faprompt.components.pre_processing import clip_pre_processor
from anomalib_faprompt.distributed import DistributedSampling, SharedWorkspace
from anomalib_faprompt.models.prompt_files import PromptWeightsCheckpoint
from anomalib_faprompt.post_processing import NormalFPRPostProcessor
from anomalib_faprompt.visualization import HeatMapVisualizer

if TYPE_CHECKING:
    from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
    from anomalib_faprompt.models.settings import SharedSettings


def normal_fpr_post_processor(settings: SharedSettings, post_processor: nn.Module | bool) -> nn.Module | bool:
    """The post-processor to build the model with: for ``normal_fpr``, a :class:`NormalFPRPostProcessor`.

    It takes the default's place; without ``normal_fpr``, ``post_processor`` is returned as given.

    Raises:
        ValueError: If ``normal_fpr`` is set together with a post-processor of the user's (or none).
    """
    if settings.normal_fpr is None:
        return post_processor
    if post_processor is True:
        return NormalFPRPostProcessor(settings.normal_fpr, normal_images=settings.normal_images)
    given = type(post_processor).__name__ if isinstance(post_processor, nn.Module) else repr(post_processor)
    msg = (
        f"normal_fpr={settings.normal_fpr:g} sets the thresholds through the default post-processor, but "
        f"post_processor={given} was given. Either leave post_processor out, or pass "
        "NormalFPRPostProcessor(normal_fpr=...) as post_processor without the model's normal_fpr."
    )
    raise ValueError(msg)


class AnomalibParts:
    """Components and callbacks of a prompt method (see the module docstring)."""

    model: PromptedCLIP
    evaluator: Any
    post_processor: Any

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Resize (bicubic, antialiased) to the model's input size and normalise with CLIP's mean and std.

        Masks are resized alongside the images by anomalib's pre-processor. Exported graphs resize the same way
        (:class:`~anomalib_faprompt.components.pre_processing.ClipPreProcessor`), for images of any size.
        """
        return clip_pre_processor(image_size)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's default post-processor (adaptive thresholds and min-max normalisation)."""
        return PostProcessor()

    @staticmethod
    def configure_evaluator(rates: bool = False) -> RawOutputEvaluator:
        """The papers' metrics (image AUROC and AP, pixel AUROC and AUPRO) on raw outputs, and image F1.

        Threshold-free metrics see the raw scores and maps, as in the ``zero_shot`` table (see
        :class:`~anomalib_faprompt.components.metrics.RawOutputEvaluator`); F1 needs the post-processor's labels.
        Pixel metrics are skipped for data without masks. With ``rates`` (models with ``normal_fpr``), also the
        image false- and true-positive rates at the threshold (``image_FPR``, ``image_TPR``).
        """
        labels = [F1Score(fields=["pred_label", "gt_label"], prefix="image_"), *(threshold_rates() if rates else [])]
        return RawOutputEvaluator(test_metrics=[*paper_metrics(strict=False), *labels])

    @staticmethod
    def configure_visualizer() -> HeatMapVisualizer:
        """Heat-maps with titled, distinct panels and, for untrained CLIP weights, a notice below them.

        The panels are Image, Gt Mask, Pred Mask and Image + Anomaly Map, those the data and the model give; the
        notice names e.g. the random small CLIP (see :mod:`anomalib_faprompt.visualization`).
        """
        return HeatMapVisualizer()

    def use_output_scale_thresholds(self) -> None:
        """Give the post-processor the scale of the outputs until validation data calibrates it.

        Scores lie in [0, s] and maps in [0, s · L] for L feature layers, with ``s`` the model's ``output_scale``
        (1 for anomaly probabilities; ½ for PromptAD's half harmonic means). Without statistics anomalib's
        post-processor passes them through unthresholded (labels and masks would be the raw values), as when
        predicting on a folder or exporting a model whose prompts were loaded. With these ranges scores and maps
        are normalised to [0, 1] and labelled anomalous above half their range. Validation replaces them (anomalib
        validates a zero-shot model before testing it).
        """
        if not isinstance(self.post_processor, PostProcessor):
            return
        score = float(getattr(self.model, "output_scale", 1.0))
        pixel = score * len(self.model.feature_layers)
        set_default_thresholds(self.post_processor, Thresholds(0.5 * score, 0.0, score, 0.5 * pixel, 0.0, pixel))

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
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if isinstance(self.evaluator, RawOutputEvaluator):
            position = next((i for i, callback in enumerate(callbacks) if callback is self.post_processor), 0)
            callbacks.insert(position, self.evaluator.before_post_processing)
        own = [PromptWeightsCheckpoint(), DistributedSampling(), SharedWorkspace()]
        for callback in own:
            setattr(callback, MODEL_CREATED, True)
        return hand_over_callbacks(self, [*callbacks, *own])
