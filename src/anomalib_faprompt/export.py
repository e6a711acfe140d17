"""What exporting a model needs beyond anomalib's ``ExportMixin``: refusals before any work, inference-only graphs.

- :func:`check_compression` refuses an OpenVINO compression whose package is missing *before* the model is traced
  (anomalib checks for NNCF after the ONNX export, then raises a bare ``ModuleNotFoundError``).
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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

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
