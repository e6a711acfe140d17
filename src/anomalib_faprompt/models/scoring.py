"""Scoring with a prompt method: non-finite values refused in the engine's steps, labelled anomalous in graphs.

:class:`GuardedScoring`, a part of :class:`~anomalib_faprompt.models.base.PromptMethod`, scores validation, test
and prediction batches after checking that their images, and then the scores and maps, are finite: a NaN score
would be labelled normal by anomalib's post-processor (a comparison with NaN is false). The error names the image
files and the cause (non-finite prompts, or an overflow under reduced precision). Its ``forward`` (the pipeline an
exported graph holds) cannot raise on values: it checks the images' shape and type, and labels an image whose
outputs are not finite anomalous (:mod:`~anomalib_faprompt.components.guards`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from anomalib.data import Batch, InferenceBatch

from anomalib_faprompt.components.guards import accepted_images, flag_untrusted
from anomalib_faprompt.prompt_weights import NonFiniteValuesError

if TYPE_CHECKING:
    from anomalib_faprompt.clip.prompted_clip import PromptedCLIP


def _describe_images(batch: Batch, indices: list[int]) -> str:
    paths = getattr(batch, "image_path", None)
    if paths is not None and len(paths) == len(batch.image):
        return ", ".join(str(paths[index]) for index in indices)
    return f"images {indices} of the batch (no file paths)"


class GuardedScoring:
    """The steps and ``forward`` of a prompt method, with their guards (see the module docstring)."""

    model: PromptedCLIP
    method_name: str
    pre_processor: Any
    post_processor: Any

    def check_finite_input(self, batch: Batch, stage: str, finite: torch.Tensor | None = None) -> None:
        """Refuse a batch with non-finite pixels after pre-processing, naming its image files.

        Raises:
            NonFiniteValuesError: Naming the images and what to check.
        """
        if finite is None:
            finite = torch.isfinite(batch.image).flatten(1).all(dim=1)
        if bool(finite.all()):
            return
        bad = torch.nonzero(~finite).flatten().tolist()
        msg = (
            f"{self.method_name} cannot {stage}: {len(bad)} input image(s) hold non-finite values (NaN or inf) after "
            f"pre-processing: {_describe_images(batch, bad)}. Their scores would be NaN, which anomalib's "
            "post-processor labels normal. Check these files and the transforms of the pre-processor and dataset."
        )
        raise NonFiniteValuesError(msg)

    def _check_finite_output(self, batch: Batch, stage: str, finite: torch.Tensor) -> None:
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
            f"image(s) with finite inputs: {_describe_images(batch, bad)}. {cause}"
        )
        raise NonFiniteValuesError(msg)

    def score(self, batch: Batch, stage: str) -> Batch:
        """Score ``batch`` after checking that its images, and then the scores and maps, are finite.

        The checks run here, in the Lightning steps, not in :meth:`forward`: ``torch.export`` cannot trace a
        Python ``if`` on tensor values. An exported model (``to_torch``/``to_onnx``/``to_openvino``) does not raise:
        a NaN or infinite pixel gives a NaN score, which its graph labels anomalous (:meth:`forward`).

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
            self.check_finite_input(batch, stage, input_finite)
            raise
        outputs = [predictions.pred_score.reshape(len(batch.image), -1), predictions.anomaly_map.flatten(1)]
        output_finite = torch.cat([torch.isfinite(output) for output in outputs], dim=1).all(dim=1)
        if not bool((input_finite & output_finite).all()):
            self.check_finite_input(batch, stage, input_finite)
            self._check_finite_output(batch, stage, output_finite)
        return batch.update(**predictions._asdict())

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> InferenceBatch:
        """Pre-process, score and post-process raw images: the pipeline exported graphs hold.

        Images are checked first (float16/float64 cast to float32; an empty batch, another channel count than 3
        or integer pixels refused, naming the shape). An image whose score or map is not finite comes out labelled
        anomalous with a NaN score, never normal (:func:`~anomalib_faprompt.components.guards.flag_untrusted`).
        """
        del args, kwargs
        images = accepted_images(batch, self.method_name)
        images = self.pre_processor(images) if self.pre_processor else images
        raw = self.model(images)
        processed = self.post_processor(raw) if self.post_processor else raw
        return flag_untrusted(raw, processed)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the validation batch (anomalib uses it for thresholds and normalisation)."""
        del args, kwargs
        return self.score(batch, "validate")

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the test batch; non-finite inputs or outputs raise (see :meth:`score`)."""
        del args, kwargs
        return self.score(batch, "test")

    def predict_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score the batch to predict; non-finite inputs or outputs raise (see :meth:`score`)."""
        del args, kwargs
        return self.score(batch, "predict")
