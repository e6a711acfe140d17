"""What exporting a model needs beyond anomalib's ``ExportMixin``: refusals before any work, inference-only graphs.

- :func:`check_compression` refuses an OpenVINO compression whose package is missing *before* the model is traced
  (anomalib checks for NNCF after the ONNX export, then raises a bare ``ModuleNotFoundError``).
- :func:`check_calibration_data` refuses ``INT8_PTQ``/``INT8_ACQ`` without a datamodule, and ``INT8_ACQ`` without
  anomalous images to measure the accuracy drop on (it would compare F1 scores on normal images only), before any
  work.
- :func:`warn_quantized_memory` says when quantized activations meet a visual memory of f32 features.
- :func:`quantize_transformer` is NNCF's post-training quantization with the settings a ViT needs (``model_type``
  transformer: attention's softmax and layer norms stay in float), calibrated on the validation images (no labels
  are used).
- :func:`inference_only` exports a module whose parameters do not require gradients: a pickled ``torch`` export
  would otherwise return outputs that require grad, on which ``TorchInferencer`` fails (``.numpy()``).

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with inference_only(layer):
    ...     layer(torch.ones(1, 2)).requires_grad
    False
    >>> layer.weight.requires_grad  # restored afterwards
    True
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch import nn

logger = logging.getLogger(__name__)

#: Calibration images NNCF's post-training quantization reads at most (its default subset size).
CALIBRATION_IMAGES = 300

#: What each OpenVINO compression type needs, beside OpenVINO itself.
COMPRESSION_PACKAGES = {"INT8": "nncf", "INT8_PTQ": "nncf", "INT8_ACQ": "nncf"}
#: The extra of this package that installs them.
EXPORT_EXTRA = 'pip install "anomalib-faprompt[export]"'


def _name(compression_type: Any) -> str:
    return str(getattr(compression_type, "name", compression_type)).upper()


def check_compression(compression_type: Any, model_name: str, export_type: Any = "openvino") -> None:
    """Refuse a compression that would not happen: its package is missing, or the export is not OpenVINO's.

    Args:
        compression_type: anomalib's ``CompressionType`` (or its name), ``None`` for none.
        model_name: The model, for messages.
        export_type: The export's type; anomalib compresses OpenVINO exports only, and writes ``onnx`` and ``torch``
            exports in f32 whatever ``compression_type`` says.

    Raises:
        ValueError: If ``compression_type`` is given for another export type than OpenVINO.
        ModuleNotFoundError: If ``compression_type`` needs a package (NNCF for ``INT8``, ``INT8_PTQ``, ``INT8_ACQ``)
            that is not installed.
    """
    if compression_type is None:
        return
    kind = str(getattr(export_type, "value", export_type)).lower()
    if kind != "openvino":
        msg = (
            f"{model_name}: --compression_type {_name(compression_type)} applies to --export_type openvino only; "
            f"anomalib writes the {kind} export in f32 without it. Export to OpenVINO, or leave --compression_type out."
        )
        raise ValueError(msg)
    package = COMPRESSION_PACKAGES.get(_name(compression_type))
    if package is not None and importlib.util.find_spec(package) is None:
        msg = (
            f"{model_name}: OpenVINO compression {_name(compression_type)} needs the package '{package}', which is "
            f"not installed. Install it with {EXPORT_EXTRA} (or pip install {package}), or export without "
            "--compression_type (FP16 needs nothing more)."
        )
        raise ModuleNotFoundError(msg, name=package)


def _anomalous_count(dataset: Any) -> int | None:
    samples = getattr(dataset, "samples", None)
    if samples is None or "label_index" not in samples:
        return None
    return int((samples["label_index"] == 1).sum())


def check_calibration_data(compression_type: Any, datamodule: Any, model_name: str) -> None:
    """Refuse a quantization that has no data to calibrate on, or (``INT8_ACQ``) no anomalies to measure on.

    ``INT8_ACQ`` (NNCF's accuracy-controlled quantization) compares image F1 of the quantized and f32 models on the
    datamodule's test split, as anomalib runs it: with normal images only that F1 is undefined.

    Raises:
        ValueError: Naming the compression type, what is missing and what to use instead.
    """
    name = _name(compression_type) if compression_type is not None else None
    if name not in {"INT8_PTQ", "INT8_ACQ"}:
        return
    if datamodule is None:
        msg = (
            f"{model_name}: --compression_type {name} calibrates on the images of a datamodule's validation split; "
            "give one (--data on the CLI, datamodule= to Engine.export), or use INT8 (weights only, no data)."
        )
        raise ValueError(msg)
    if name != "INT8_ACQ":
        return
    datamodule.setup("fit")
    anomalous = _anomalous_count(getattr(datamodule, "test_data", None))
    if anomalous == 0:
        msg = (
            f"{model_name}: --compression_type INT8_ACQ measures the accuracy drop (image F1) on anomalous images of "
            f"the datamodule's test split, and {getattr(datamodule, 'name', type(datamodule).__name__)} has none. "
            "Use INT8_PTQ, which calibrates on normal images and needs no labels, or a datamodule with anomalous "
            "test images."
        )
        raise ValueError(msg)


def warn_quantized_memory(compression_type: Any, model_name: str, reference_count: int) -> None:
    """Warn that INT8 activations meet a visual memory of f32 features (``INT8_PTQ``/``INT8_ACQ`` only).

    The memory holds the reference features torch computed; the quantized encoder's features of a new image carry
    the whole rounding error into their distance to it. On the deployment benchmark's random CLIP this moved
    PromptAD's scores by up to 0.2 (INT8 weight compression: 0.003), and keeping the comparison itself in f32 did
    not help (``benchmarks/ptq_ignored_scopes.py``).
    """
    name = _name(compression_type)
    if name in {"INT8_PTQ", "INT8_ACQ"} and reference_count:
        logger.warning(
            "%s: --compression_type %s quantizes the image encoder's activations, but its visual memory holds the "
            "f32 features of %d reference image(s), so every distance to it carries the rounding error (on a random "
            "CLIP, PromptAD's scores moved by up to 0.2). Compare the exported scores with torch's on your images, "
            "or use --compression_type INT8 (weights only).",
            model_name, name, reference_count,
        )  # fmt: skip


def validation_images(datamodule: Any) -> tuple[Iterable[np.ndarray], int]:
    """The raw images of a datamodule's validation split, batch by batch (labels unread), and how many there are."""
    datamodule.setup("fit")
    dataloader = datamodule.val_dataloader()
    return (batch.image.numpy() for batch in dataloader), len(dataloader.dataset)


def quantize_transformer(model: Any, batches: Iterable[np.ndarray], count: int, keep_f32: Sequence[str] = ()) -> Any:
    """NNCF post-training quantization of an OpenVINO model of a ViT, calibrated on ``batches`` of raw images.

    The exported graph pre-processes the images itself. NNCF reads them one at a time, at most
    :data:`CALIBRATION_IMAGES`: its statistics (smooth quant, bias correction) grow with the sample, and batches of
    8 images of a ViT-L at 518 pixels took over 22 GB.

    Args:
        model: The OpenVINO model (f32).
        batches: Raw images (B, 3, H, W), float in [0, 1], e.g. :func:`validation_images`.
        count: How many images ``batches`` holds, for the log.
        keep_f32: Names of OpenVINO ops to leave unquantized (NNCF's ignored scope); none by default:
            ``benchmarks/ptq_ignored_scopes.py`` measured the similarity products and FAPrompt's top-M tail in f32,
            which left FAPrompt's and PromptAD's fidelity as it was and AnomalyCLIP's about the same.
    """
    import nncf

    if count < CALIBRATION_IMAGES:
        logger.info("INT8_PTQ: calibrating on %d images (NNCF reads up to %d).", count, CALIBRATION_IMAGES)
    images = [batch[index : index + 1] for batch in batches for index in range(len(batch))][:CALIBRATION_IMAGES]
    ignored = {"ignored_scope": nncf.IgnoredScope(names=list(keep_f32), validate=False)} if keep_f32 else {}
    return nncf.quantize(model, nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(images), **ignored)  # fmt: skip


@contextmanager
def inference_only(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with no parameter requiring gradients while the block runs; restored afterwards."""
    states = {parameter: parameter.requires_grad for parameter in module.parameters()}
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, requires_grad in states.items():
            parameter.requires_grad_(requires_grad)
