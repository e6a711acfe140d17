"""Exporting a prompt method: the whole pipeline as a graph, with the image-independent text features as constants.

:class:`PromptExport`, a part of :class:`~anomalib_faprompt.models.base.PromptMethod`, refuses untrained prompts,
computes the text features that do not depend on the image once (so the text encoder leaves AnomalyCLIP's graph),
exports at ONNX opset 18, runs the ``torch`` export without gradients, refuses a compression that would not
happen before any work, and quantizes (``INT8_PTQ``) with NNCF's transformer settings, calibrated on the validation
images (:mod:`~anomalib_faprompt.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalib_faprompt.export import (
    check_calibration_data,
    check_compression,
    inference_only,
    quantize_transformer,
    validation_images,
    warn_quantized_memory,
)
from anomalib_faprompt.logs import quiet_export

if TYPE_CHECKING:
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from anomalib.deploy import CompressionType
    from torchmetrics import Metric

#: ONNX opset of exports. The dynamo exporter emits opset 18; anomalib's default (14) needs a down-conversion
#: that fails on this graph (ReduceMean/Split axes) and leaves the model at 18 after a long warning anyway.
ONNX_OPSET = 18


class PromptExport:
    """Exports of a prompt method (see the module docstring)."""

    method_name: str
    model: Any
    device: torch.device

    def _prepare_export(self) -> None:
        """Refuse untrained prompts, then compute the text features the exported graph holds as constants.

        One eager forward in eval mode fills the model's text cache from the current parameters; while
        ``torch.export`` traces, :meth:`PromptedCLIP.cached` returns it, so the image-independent text encoder does
        not run in the exported model. FAPrompt's per-image DAP path (top-M patches, prior network, text encoder
        over the B x K shifted prompts) depends on the image and stays in the graph.
        """
        self.check_prompts_ready("export")  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        size = self.model.image_size
        with torch.no_grad():
            self.model(torch.zeros(1, 3, size, size, device=self.device))

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export the whole pipeline (pre-processing, model, post-processing) for ``TorchInferencer``.

        The exported module's parameters do not require gradients, so its outputs convert with ``.numpy()``.

        Example:
            >>> model = FAPrompt(prompt_weights="FAPrompt_mvtec.pth")  # doctest: +SKIP
            >>> model.to_torch("exports")  # doctest: +SKIP
            PosixPath('exports/weights/torch/model.pt')

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded.
        """
        self._prepare_export()
        with inference_only(self):  # type: ignore[arg-type]
            return super().to_torch(export_root, model_file_name)  # type: ignore[misc]

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (opset 18) with pre-processing inside and the static text features as constants.

        Without ``input_size`` the graph takes any image size (it resizes to ``image_size`` itself, as the engine's
        pre-processor does), as anomalib's inferencers need; the batch size is dynamic either way.

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
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

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

        Raises:
            UntrainedPromptsError: If the prompts were neither trained nor loaded.
            ModuleNotFoundError: If ``compression_type`` needs NNCF and it is not installed (before any work).
            ValueError: If ``INT8_PTQ``/``INT8_ACQ`` has no datamodule, or ``INT8_ACQ`` no anomalous test images.
        """
        self.check_prompts_ready("export")  # type: ignore[attr-defined]
        check_compression(compression_type, self.method_name)
        check_calibration_data(compression_type, datamodule, self.method_name)
        warn_quantized_memory(compression_type, self.method_name, getattr(self.model, "reference_count", 0))
        return super().to_openvino(  # type: ignore[misc]
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

    def _post_training_quantization_ov(self, model: Any, datamodule: AnomalibDataModule | None = None) -> Any:
        """``INT8_PTQ``: NNCF's quantization with the transformer settings (anomalib's passes none)."""
        return quantize_transformer(model, *validation_images(datamodule))
