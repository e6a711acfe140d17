"""Thresholds from normal images only, at a chosen false-positive rate: a post-processor for any anomalib model.

anomalib's :class:`~anomalib.post_processing.PostProcessor` sets its thresholds by maximising F1 on validation
images, which needs anomalous ones. :class:`NormalFPRPostProcessor` needs none: it sets the image threshold so that
a new normal image is flagged with probability ``normal_fpr`` on average (:class:`NormalQuantile`), and the pixel
threshold so that the share ``pixel_fpr`` of the calibration images' normal pixels lie above it. The normal images
are those of the validation split (its images labelled normal; anomalous ones are left out), or a folder given as
``normal_images``, scored by the model itself when it first validates, tests or predicts.

Everything else is anomalib's: the thresholds and the min-max range of the normal values live in the post-processor's
buffers (saved in checkpoints, baked into ONNX/OpenVINO/torch exports by ``forward``), scores and maps are
normalised so that the threshold sits at 0.5, and ``pred_label``/``pred_mask`` are ``score > threshold``.

Example:
    >>> from anomalib.models import Patchcore
    >>> post_processor = NormalFPRPostProcessor(normal_fpr=0.01)
    >>> model = Patchcore(backbone="resnet18", pre_trained=False, post_processor=post_processor)
    >>> model.post_processor.normal_fpr
    0.01

On the CLI: ``anomalib train --model Patchcore --model.post_processor anomalib_faprompt.NormalFPRPostProcessor
--model.post_processor.normal_fpr 0.01``; the prompt methods take ``--model.normal_fpr 0.01`` themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import LightningModule, Trainer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anomalib_faprompt.compat import Thresholds, set_thresholds
from anomalib_faprompt.post_processing.normal_quantile import NormalQuantile, check_rate

logger = logging.getLogger(__name__)

#: Images scored at once when calibrating on a folder.
FOLDER_BATCH = 8


def check_normal_images(path: str | Path | None, fpr: float | None = None) -> Path | None:
    """``path`` as an existing folder (or image) of normal images, or ``None``; with ``fpr``, enough of them.

    Raises:
        FileNotFoundError: Naming the setting and the path.
        ValueError: If the folder holds fewer images than a threshold at ``fpr`` needs, naming both numbers.
    """
    if path in {None, ""}:
        return None
    folder = Path(path).expanduser()
    if not folder.exists():
        msg = f"normal_images '{folder}' does not exist: give a folder of normal images (or one image) to calibrate on."
        raise FileNotFoundError(msg)
    if fpr is not None:
        from anomalib.data.utils import get_image_filenames

        try:
            count = len(get_image_filenames(folder))
        except ValueError:  # anomalib's: no image files found
            count = 0
        NormalQuantile.check_count(count, fpr, f"normal images (in normal_images '{folder}')")
    return folder


def _raw_outputs(pl_module: LightningModule, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's raw scores and maps of raw images, pre-processed as test images (eval mode, no gradients)."""
    pre_processor = getattr(pl_module, "pre_processor", None)
    if isinstance(pre_processor, PreProcessor):
        images = [pre_processor.transform(image) for image in images]
    model = pl_module.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.stack(images).to(pl_module.device))
    finally:
        model.train(training)
    return output.pred_score, output.anomaly_map


class NormalValues(Metric):
    """The scores and maps of the normal images seen, gathered over processes (``cat``) when computed."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.scores: list[torch.Tensor]
        self.maps: list[torch.Tensor]

    def update(self, scores: torch.Tensor, maps: torch.Tensor | None, labels: torch.Tensor | None = None) -> None:
        """Keep the normal ones (label 0; all of them without labels)."""
        scores = scores.detach().reshape(len(scores), -1)[:, 0].float()
        normal = torch.ones_like(scores, dtype=torch.bool) if labels is None else labels.reshape(-1) == 0
        self.scores.append(scores[normal].cpu())
        if maps is not None:
            self.maps.append(maps.detach().reshape(len(scores), -1)[normal].float().cpu())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The normal scores (N,) and maps (N, pixels), ``None`` for maps when none were given."""
        scores = dim_zero_cat(self.scores) if self.scores else torch.empty(0)
        maps = dim_zero_cat(self.maps) if self.maps else None
        return scores, maps


def _forget_calibration(module: NormalFPRPostProcessor, incompatible_keys: object) -> None:
    del incompatible_keys
    module.normal_image_count.fill_(float("nan"))


class NormalFPRPostProcessor(PostProcessor):
    """anomalib's post-processor with thresholds set from normal images at a chosen false-positive rate.

    Args:
        normal_fpr: Share of normal images to flag anomalous (0.01: one in a hundred on average); at least
            ``1 / (N + 1)`` for ``N`` normal images, refused below that.
        pixel_fpr: Share of the normal images' pixels to flag in ``pred_mask``; ``normal_fpr`` if ``None``.
        normal_images: A folder (or image) of normal images to calibrate on instead of the validation split, scored
            by the model when it first validates, tests or predicts.
        kwargs: anomalib's ``PostProcessor`` arguments (``enable_normalization``, sensitivities, ...).

    Raises:
        ValueError: For a rate outside (0, 1), at construction.
        FileNotFoundError: For a ``normal_images`` path that does not exist, at construction.
    """

    def __init__(
        self,
        normal_fpr: float = 0.01,
        pixel_fpr: float | None = None,
        normal_images: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Not in the checkpoint's post-processor config: restoring a checkpoint must not undo the rate this run asks
        # for (the model's hparams, or the constructor, give it).
        self.normal_fpr = check_rate("normal_fpr", normal_fpr)
        self.pixel_fpr = self.normal_fpr if pixel_fpr is None else check_rate("pixel_fpr", pixel_fpr)
        folder = check_normal_images(normal_images, self.normal_fpr)
        self.normal_images = None if folder is None else str(folder)
        self._normal_values = NormalValues()
        # Not persistent: a checkpoint's thresholds load into any PostProcessor, and this only says whether this
        # process calibrated (a folder is scored again after loading).
        self.register_buffer("normal_image_count", torch.tensor(float("nan")), persistent=False)
        self._warned_uncalibrated = False
        # Loaded thresholds (a checkpoint restored by ``ckpt_path``, after a validation may have calibrated) stand
        # until the next test or prediction can set them from this run's normal images.
        self.register_load_state_dict_post_hook(_forget_calibration)

    @property
    def calibrated(self) -> bool:
        """Whether the thresholds were set from normal images in this process."""
        return not bool(torch.isnan(self.normal_image_count))

    # Calibration -------------------------------------------------------------------------------------------------

    def calibrate(self, scores: torch.Tensor, maps: torch.Tensor | None, source: str) -> NormalQuantile:
        """Set the thresholds and ranges from normal scores (N,) and maps (N, ...); returns the image threshold.

        Raises:
            ValueError: If there are too few normal images for ``normal_fpr`` or their values are not finite.
        """
        values = [scores] if maps is None else [scores, maps]
        if not all(bool(torch.isfinite(value).all()) for value in values):
            msg = f"{type(self).__name__}: non-finite scores or maps among the normal images of {source}."
            raise ValueError(msg)
        image = NormalQuantile.of(scores, self.normal_fpr, f"normal images (from {source})")
        pixel_range, pixel_text = (float("nan"),) * 3, ""
        if maps is not None:
            pixel = NormalQuantile.of(maps, self.pixel_fpr, "normal pixels", setting="pixel_fpr")
            pixel_range = (pixel.value, maps.min().item(), maps.max().item())
            pixel_text = (
                f" Pixel threshold {pixel.value:.6g}: {pixel.above / pixel.count:.4f} of the {pixel.count} normal "
                f"pixels above it (pixel_fpr={self.pixel_fpr:g}; pixels of one image are not independent, so no "
                "interval is stated for masks)."
            )
        set_thresholds(self, Thresholds(image.value, scores.min().item(), scores.max().item(), *pixel_range))
        self.normal_image_count.fill_(image.count)
        low, high = image.rate_interval()
        logger.info(
            "normal_fpr=%g: image threshold %.6g from %d normal images of %s (%d above it). A new normal image is "
            "flagged with probability %.4f on average; with %d normal images that probability is uncertain: 95 %% "
            "interval %.4f-%.4f.%s",
            self.normal_fpr, image.value, image.count, source, image.above, image.expected_rate, image.count, low,
            high, pixel_text,
        )  # fmt: skip
        return image

    def calibrate_on_folder(self, pl_module: LightningModule) -> NormalQuantile:
        """Score the images of ``normal_images`` with the model (pre-processed as test images), then calibrate.

        Raises:
            ValueError: If the folder holds too few images for ``normal_fpr``.
        """
        from anomalib.data import PredictDataset

        dataset = PredictDataset(self.normal_images)
        batches = (
            [dataset[index].image for index in range(start, min(start + FOLDER_BATCH, len(dataset)))]
            for start in range(0, len(dataset), FOLDER_BATCH)
        )
        values = NormalValues()
        for images in batches:
            values.update(*_raw_outputs(pl_module, images))
        return self.calibrate(*values.compute(), f"'{self.normal_images}'")

    def calibrate_on_validation_split(self, trainer: Trainer, pl_module: LightningModule) -> NormalQuantile | None:
        """Score the normal images of the datamodule's validation split, then calibrate (``None``: no such split).

        For a test or prediction that did not validate first (e.g. ``anomalib test --ckpt_path``).
        """
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "val_data", None) is None:
            return None
        values = NormalValues()
        for batch in datamodule.val_dataloader():
            values.update(*_raw_outputs(pl_module, list(batch.image)), batch.gt_label)
        if not values.update_called:
            return None
        return self.calibrate(*values.compute(), "the validation split")

    def _calibrate_once(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.calibrated:
            return
        if self.normal_images is not None:
            self.calibrate_on_folder(pl_module)
        else:
            self.calibrate_on_validation_split(trainer, pl_module)

    def _warn_uncalibrated(self, stage: str) -> None:
        if self.calibrated or self._warned_uncalibrated:
            return
        self._warned_uncalibrated = True
        logger.warning(
            "normal_fpr=%g: the thresholds were not set from normal images in this run (no validation split and no "
            "normal_images folder), so %s labels come from the thresholds loaded or set before. Give a datamodule "
            "with a validation split, or normal_images, to calibrate.",
            self.normal_fpr,
            stage,
        )

    # Lightning hooks ---------------------------------------------------------------------------------------------

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Keep the scores and maps of the batch's normal images (unless a folder is the source)."""
        del trainer, pl_module, args, kwargs
        if self.normal_images is None:
            self._normal_values.update(outputs.pred_score, outputs.anomaly_map, outputs.gt_label)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the thresholds from the normal images seen (or from the folder, once)."""
        if self.normal_images is not None:
            self._calibrate_once(trainer, pl_module)
            return
        if not self._normal_values.update_called:
            return
        scores, maps = self._normal_values.compute()
        self._normal_values.reset()
        self.calibrate(scores, maps, "the validation split")

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Calibrate first if no validation did (folder, else validation split), then post-process as anomalib does."""
        self._calibrate_once(trainer, pl_module)
        self._warn_uncalibrated("test")
        super().on_test_batch_end(trainer, pl_module, outputs, *args, **kwargs)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Calibrate first if no validation did (folder, else validation split), then post-process as anomalib does."""
        self._calibrate_once(trainer, pl_module)
        self._warn_uncalibrated("predict")
        super().on_predict_batch_end(trainer, pl_module, outputs, *args, **kwargs)
