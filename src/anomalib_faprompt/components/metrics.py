"""The papers' metrics, computed on the models' raw outputs whatever the path that runs them.

anomalib updates an evaluator's metrics *after* the post-processor, which min-max normalises scores and maps with
statistics of the validation data and clamps them to [0, 1]. Clamping ties every value beyond the calibration range,
so AUROC, AP and AUPRO would depend on the validation split (a zero-shot model validated on a few target images
reports other numbers than on its raw outputs). :class:`RawOutputEvaluator` updates the threshold-free metrics from
the raw outputs, before post-processing, and only the metrics of labels and masks (F1) after it.

Example:
    >>> from anomalib_faprompt.components.metrics import PAPER_METRICS, paper_evaluator
    >>> evaluator = paper_evaluator()
    >>> [metric.name for metric in evaluator.test_metrics] == list(PAPER_METRICS)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.metrics.base import AnomalibMetric
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.classification import BinaryAveragePrecision, BinaryRecall, BinarySpecificity

logger = logging.getLogger(__name__)

#: The four metrics of the AnomalyCLIP and FAPrompt papers, as reported by every path of this project.
PAPER_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO")

#: Batch fields that only the post-processor fills (thresholded labels and masks).
POST_PROCESSED_FIELDS = frozenset({"pred_label", "pred_mask"})


class AP(AnomalibMetric, BinaryAveragePrecision):  # type: ignore[misc]
    """Average precision (scikit-learn's definition) as an anomalib metric; reported as ``<prefix>AP``."""


class FPR(AnomalibMetric, BinarySpecificity):  # type: ignore[misc]
    """Share of normal samples labelled anomalous (1 − specificity); reported as ``<prefix>FPR``.

    Undefined (NaN, with a notice) without normal samples: torchmetrics' 0 specificity would read as FPR 1.
    """

    #: The class the rate is a share of (:func:`undefined_reason`).
    needs = "normal"

    def compute(self) -> torch.Tensor:
        """``1 − specificity`` over the samples seen."""
        return 1.0 - super().compute()


class TPR(AnomalibMetric, BinaryRecall):  # type: ignore[misc]
    """Share of anomalous samples labelled anomalous (recall); reported as ``<prefix>TPR``."""

    needs = "anomalous"


def threshold_rates() -> list[AnomalibMetric]:
    """Image false- and true-positive rates at the post-processor's threshold (``image_FPR``, ``image_TPR``)."""
    return [FPR(fields=["pred_label", "gt_label"], prefix="image_"),
            TPR(fields=["pred_label", "gt_label"], prefix="image_")]  # fmt: skip


def paper_metrics(strict: bool = True) -> list[AnomalibMetric]:
    """Image AUROC and AP, pixel AUROC and AUPRO (FPR ≤ 0.3), named as in :data:`PAPER_METRICS`.

    Args:
        strict: Whether a batch without masks is an error for the pixel metrics (``False`` skips them, for
            datasets without masks).
    """
    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AP(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=strict),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3, strict=strict),
    ]


def _reads_raw_outputs(metric: AnomalibMetric) -> bool:
    return not POST_PROCESSED_FIELDS & set(metric.fields)


class _UpdateBeforePostProcessing(Callback):
    """Updates the evaluator's threshold-free metrics; the model orders it before its post-processor."""

    def __init__(self, evaluator: RawOutputEvaluator) -> None:
        self.evaluator = evaluator

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{id(self.evaluator)}]"

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Update the raw-output validation metrics."""
        del trainer, pl_module, outputs, args, kwargs
        self.evaluator.update(self.evaluator.val_metrics, batch, raw=True)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Update the raw-output test metrics."""
        del trainer, pl_module, outputs, args, kwargs
        self.evaluator.update(self.evaluator.test_metrics, batch, raw=True)


class RawOutputEvaluator(Evaluator):
    """anomalib's evaluator, with threshold-free metrics on the raw outputs (see the module docstring).

    The model places :attr:`before_post_processing` before its post-processor among its callbacks. Where nothing
    does (a model that does not know this class), every metric is updated after post-processing, as in anomalib.

    Args:
        val_metrics: Validation metrics.
        test_metrics: Test metrics.
        compute_on_cpu: Whether to compute metrics on the CPU.

    Example:
        >>> from anomalib.metrics import F1Score
        >>> evaluator = RawOutputEvaluator(test_metrics=[*paper_metrics(), F1Score(fields=["pred_label", "gt_label"])])
        >>> len(evaluator.test_metrics)
        5
    """

    def __init__(
        self,
        val_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        test_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        compute_on_cpu: bool = True,
    ) -> None:
        super().__init__(val_metrics=val_metrics, test_metrics=test_metrics, compute_on_cpu=compute_on_cpu)
        self.before_post_processing = _UpdateBeforePostProcessing(self)
        self._raw_updated = False

    @classmethod
    def from_evaluator(cls, evaluator: Evaluator) -> RawOutputEvaluator:
        """The same metrics (the same metric objects) in a :class:`RawOutputEvaluator`."""
        if isinstance(evaluator, cls):
            return evaluator
        return cls(list(evaluator.val_metrics), list(evaluator.test_metrics), evaluator.compute_on_cpu)

    def update(self, metrics: Sequence[AnomalibMetric], batch: Any, raw: bool) -> None:
        """Update the metrics that read raw outputs (``raw=True``) or post-processed ones (``raw=False``).

        After post-processing, metrics of raw outputs are updated too if no update came before it for this batch
        (no callback ordered before the post-processor), so that no metric is ever left without data.
        """
        if raw:
            self._raw_updated = True
        for metric in metrics:
            reads_raw = _reads_raw_outputs(metric)
            if reads_raw == raw or (not raw and reads_raw and not self._raw_updated):
                metric.update(batch)
        if not raw:
            self._raw_updated = False

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Update the validation metrics of labels and masks (and raw ones not updated before post-processing)."""
        del trainer, pl_module, outputs, args, kwargs
        self.update(self.val_metrics, batch, raw=False)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Update the test metrics of labels and masks (and raw ones not updated before post-processing)."""
        del trainer, pl_module, outputs, args, kwargs
        self.update(self.test_metrics, batch, raw=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the validation metrics; undefined ones as NaN (see :meth:`log_metrics`)."""
        del pl_module
        self.log_metrics(self.val_metrics, trainer, "validation")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the test metrics; undefined ones as NaN (see :meth:`log_metrics`)."""
        del pl_module
        self.log_metrics(self.test_metrics, trainer, "test")

    def log_metrics(self, metrics: Sequence[AnomalibMetric], trainer: Trainer, split: str) -> None:
        """Log each metric as anomalib's evaluator does, but an undefined one as NaN with a notice, never as 0.

        AUROC, AP and AUPRO rank anomalous against normal samples: without both among the targets (a split of only
        normal or only anomalous images, a single image, masks without an anomalous pixel) they are undefined, and
        torchmetrics returns 0 for them. F1 is undefined without anomalous samples. The notice names the metric,
        the data and the counts.
        """
        for metric in metrics:
            reason = undefined_reason(metric)
            value: Any = metric if reason is None else torch.tensor(float("nan"))
            self.log(metric.name, value, sync_dist=reason is not None and trainer.world_size > 1)
            if trainer.barebones:  # logging is off there: anomalib fills the trainer's metrics itself
                computed = metric.compute() if reason is None else value
                trainer.callback_metrics[metric.name] = computed
                trainer.logged_metrics[metric.name] = computed
            if reason is None:
                continue
            metric.reset()
            if trainer.is_global_zero:
                logger.warning(
                    "%s is undefined on %s (%s split): %s. Reported as NaN, not as a number.",
                    metric.name,
                    data_name(trainer),
                    split,
                    reason,
                )


def class_counts(metric: AnomalibMetric) -> tuple[int, int] | None:
    """(normal, anomalous) samples among the targets a metric holds, over every process; ``None`` if it cannot say.

    Ranking metrics (AUROC, AP, AUPRO) keep their targets (``target``); stat-score metrics (F1) count
    ``tp``/``fp``/``tn``/``fn``. Images count for image metrics, pixels for pixel metrics.
    """
    with metric.sync_context(should_sync=True, should_unsync=True):
        state = metric.metric_state
        if "target" in state:
            targets = state["target"] if isinstance(state["target"], list) else [state["target"]]
            anomalous = sum(int((target > 0).sum()) for target in targets)
            return sum(target.numel() for target in targets) - anomalous, anomalous
        if {"tp", "fp", "tn", "fn"} <= state.keys():
            return int(state["fp"].sum() + state["tn"].sum()), int(state["tp"].sum() + state["fn"].sum())
    return None


def undefined_reason(metric: AnomalibMetric) -> str | None:
    """Why ``metric`` is undefined on the data it was updated with, or ``None`` when it is defined (or unknown).

    Example:
        >>> import torch
        >>> from anomalib.data import ImageBatch
        >>> metric = AUROC(fields=["pred_score", "gt_label"], prefix="image_")
        >>> batch = ImageBatch(image=torch.rand(2, 3, 8, 8), pred_score=torch.rand(2), gt_label=torch.zeros(2).long())
        >>> metric.update(batch)
        >>> undefined_reason(metric)
        'its 2 images are all normal, and image_AUROC needs normal and anomalous ones'
    """
    if not metric.update_called:
        return None  # not updated (e.g. pixel metrics without masks): anomalib's own handling
    counts = class_counts(metric)
    if counts is None:
        return None
    normal, anomalous = counts
    unit = "pixels" if "mask" in metric.fields[-1] else "images"
    needs_both = "tp" not in metric.metric_state
    if needs_both and (normal == 0 or anomalous == 0):
        kind = "normal" if anomalous == 0 else "anomalous"
        return f"its {normal + anomalous} {unit} are all {kind}, and {metric.name} needs normal and anomalous ones"
    if getattr(metric, "needs", None) == "normal":
        return f"its {anomalous} {unit} are all anomalous, and {metric.name} needs normal ones" if not normal else None
    if anomalous == 0:
        return f"its {normal} {unit} are all normal, and {metric.name} needs anomalous ones"
    return None


def data_name(trainer: Trainer) -> str:
    """The dataset and category a trainer evaluates (``MVTecAD/bottle``), for messages."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return "the data given to the trainer"
    name = getattr(datamodule, "name", type(datamodule).__name__)
    category = getattr(datamodule, "category", None)
    return f"{name}/{category}" if category else str(name)


def paper_evaluator() -> RawOutputEvaluator:
    """The papers' four metrics (:data:`PAPER_METRICS`) on raw outputs, as in the ``zero_shot`` table."""
    return RawOutputEvaluator(test_metrics=paper_metrics())
