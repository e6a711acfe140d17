"""Guards of the models' ``forward``, the path exported graphs take: inputs checked, untrusted outputs anomalous.

The engine's loops refuse non-finite inputs and outputs, naming the image files. A model's ``forward`` (what
``torch.export`` traces into ONNX and OpenVINO) cannot raise on tensor values inside an exported graph, and on an
inspection line "normal" is the dangerous default: anomalib's post-processor labels a NaN score normal (a
comparison with NaN is false) and clamps an infinite one into range. :func:`flag_untrusted` marks every image
whose raw score or map is not finite as anomalous (``pred_label`` true, score NaN) and every non-finite pixel as
anomalous (``pred_mask`` true), in torch as in the exported graphs.

:func:`accepted_images` checks what comes in before anything runs: float16 and float64 images are cast to float32;
an empty batch, another number of channels than 3, a shape other than (B, 3, H, W) or integer pixels are refused,
naming the shape and what is expected.

Example:
    >>> import torch
    >>> from anomalib.data import InferenceBatch
    >>> raw = InferenceBatch(pred_score=torch.tensor([0.2, float("nan")]), anomaly_map=torch.zeros(2, 4, 4))
    >>> processed = raw._replace(pred_label=torch.tensor([False, False]), pred_mask=torch.zeros(2, 4, 4).bool())
    >>> flag_untrusted(raw, processed).pred_label
    tensor([False,  True])
"""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch

#: Image dtypes cast to float32 on the way in (any float holds pixels in [0, 1]).
CAST_DTYPES = (torch.float16, torch.bfloat16, torch.float64)


def accepted_images(images: torch.Tensor, model_name: str) -> torch.Tensor:
    """``images`` as float32 (B, 3, H, W) with B ≥ 1, or a ``ValueError`` that names the shape and what is expected.

    Raises:
        ValueError: For a batch that is empty, not 4-dimensional, of another channel count than 3, or of integer
            pixels.
    """
    if not isinstance(images, torch.Tensor):
        msg = f"{model_name} expects a tensor of images (B, 3, H, W), got a {type(images).__name__}."
        raise TypeError(msg)
    shape = tuple(images.shape)
    expected = "float images of shape (B, 3, H, W) with B >= 1, RGB values in [0, 1]"
    if images.dim() != 4 or images.shape[1] != 3:
        hint = ""
        if images.dim() == 3 and images.shape[0] == 3:
            hint = " For one image, add the batch dimension: images[None]."
        elif images.dim() == 4 and images.shape[1] in {1, 4}:
            hint = (
                " Convert greyscale images to RGB (repeat the channel) and drop an alpha channel, as anomalib's "
                "read_image does (PIL's convert('RGB'))."
            )
        msg = f"{model_name} expects {expected}; got shape {shape}.{hint}"
        raise ValueError(msg)
    if not torch.compiler.is_exporting() and images.shape[0] == 0:
        msg = f"{model_name} expects {expected}; got an empty batch, shape {shape}."
        raise ValueError(msg)
    if not images.is_floating_point():
        msg = (
            f"{model_name} expects {expected}; got {images.dtype} pixels of shape {shape}. Scale them to [0, 1] "
            "first (e.g. images.float() / 255)."
        )
        raise ValueError(msg)
    return images.float() if images.dtype in CAST_DTYPES else images


def flag_untrusted(raw: InferenceBatch, processed: InferenceBatch) -> InferenceBatch:
    """``processed`` with every image whose raw score or map is not finite labelled anomalous, its score NaN.

    Args:
        raw: The model's outputs before post-processing (``pred_score`` (B,), ``anomaly_map`` (B, H, W)).
        processed: The post-processor's outputs of the same batch (labels and masks may be ``None``).

    Returns:
        ``processed`` with ``pred_label`` true and ``pred_score`` NaN where the raw outputs of an image are not all
        finite, and ``pred_mask`` true on every non-finite pixel.
    """
    scores, maps = raw.pred_score, raw.anomaly_map
    if scores is None or maps is None:
        return processed
    pixels_finite = torch.isfinite(maps)
    finite = torch.isfinite(scores.reshape(scores.shape[0], -1)).all(dim=1) & pixels_finite.flatten(1).all(dim=1)
    updates = {}
    if processed.pred_score is not None:
        score = processed.pred_score
        updates["pred_score"] = torch.where(finite.reshape(score.shape), score, torch.full_like(score, float("nan")))
    if processed.pred_label is not None:
        label = processed.pred_label
        updates["pred_label"] = label | ~finite.reshape(label.shape)
    if processed.pred_mask is not None:
        updates["pred_mask"] = processed.pred_mask | ~pixels_finite.reshape(processed.pred_mask.shape)
    return processed._replace(**updates)
