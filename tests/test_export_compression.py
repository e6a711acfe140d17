"""OpenVINO at reduced precision: every compression type exports and runs for every method (small CLIPs).

``FP16`` (weights stored in f16), ``INT8`` (NNCF weight compression) and ``INT8_PTQ`` (NNCF quantization with the
transformer settings, calibrated on the validation images) through ``Engine.export``; the exported model is compiled
in f32 and its scores stay near torch's (within 1e-2 for FP16 weights, 0.1 for INT8; the random CLIPs' scores
cluster within a few hundredths, so their ranks say nothing here: benchmarks/deployment.py measures rank
correlation and AUROC at real sizes). ``INT8_ACQ`` without
anomalous test images and ``INT8_PTQ`` without a datamodule are refused before any work.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from PIL import Image

from anomalib_faprompt.methods import METHODS
from test_export_fidelity import scoring_model

OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def folder_data(root: Path, anomalous: bool = True) -> Folder:
    return Folder(
        name="widgets", root=root / "widget", normal_dir="train/good", abnormal_dir="test/spot" if anomalous else None,
        mask_dir="ground_truth/spot" if anomalous else None, normal_test_dir="test/good", val_split_mode="same_as_test",
        num_workers=0, train_batch_size=2, eval_batch_size=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def images(tiny_mvtec) -> np.ndarray:
    paths = sorted((tiny_mvtec / "widget" / "test").glob("*/*.png"))
    return np.stack([np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255 for path in paths]).transpose(
        0, 3, 1, 2
    )


def export_onnx_once(model: Any, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """The model's ONNX graph is exported once; the later ``to_onnx`` calls of ``to_openvino`` get a copy of it.

    Each compression starts from the same graph: exporting it again would only repeat the slowest step.
    """
    export = model.to_onnx

    def copy_of_first_export(export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        if not cache.exists():
            export(cache, *args, **kwargs)
        [graph] = cache.rglob("*.onnx")
        target = Path(export_root) / graph.parent.relative_to(cache)
        shutil.copytree(graph.parent, target, dirs_exist_ok=True)
        return target / graph.name

    monkeypatch.setattr(model, "to_onnx", copy_of_first_export)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_compression_exports_and_scores_like_torch(method, method_settings, released_prompts, tiny_mvtec,
                                                         images, tmp_path, monkeypatch):  # fmt: skip
    import openvino

    model = scoring_model(method, method_settings, released_prompts)
    export_onnx_once(model, monkeypatch, tmp_path / "onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).pred_score.reshape(-1).numpy()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    sizes = {}
    for compression in (CompressionType.FP16, CompressionType.INT8, CompressionType.INT8_PTQ):
        path = engine.export(model, "openvino", export_root=tmp_path / compression.name, compression_type=compression,
                             datamodule=folder_data(tiny_mvtec))  # fmt: skip
        sizes[compression.name] = Path(path).with_suffix(".bin").stat().st_size
        compiled = openvino.Core().compile_model(str(path), "CPU", OPENVINO_F32)
        outputs = {next(iter(port.names)): value for port, value in compiled(images).items()}
        scores = np.asarray(outputs["pred_score"]).reshape(-1)
        assert np.isfinite(scores).all(), compression
        assert outputs["pred_label"].shape == (len(images),) or outputs["pred_label"].size == len(images)
        tolerance = 1e-2 if compression == CompressionType.FP16 else 0.1
        assert np.abs(scores - expected).max() < tolerance, (compression, scores, expected)
    # Weights stored smaller than f32 (the f32 IR is twice the FP16 one).
    assert sizes["INT8"] < sizes["FP16"]


def test_int8_acq_without_anomalous_images_is_refused_before_any_work(method_settings, released_prompts, tiny_mvtec,
                                                                      tmp_path, monkeypatch):  # fmt: skip
    model: Any = scoring_model("AnomalyCLIP", method_settings, released_prompts)
    traced = []
    monkeypatch.setattr(type(model), "to_onnx", lambda *args, **kwargs: traced.append(1))
    with pytest.raises(ValueError, match=r"INT8_ACQ measures the accuracy drop .* widgets has none. Use INT8_PTQ"):
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_ACQ,
                          datamodule=folder_data(tiny_mvtec, anomalous=False))  # fmt: skip
    with pytest.raises(ValueError, match=r"INT8_PTQ calibrates on the images of a datamodule's validation split"):
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_PTQ)
    assert traced == []


def quantized_products(graph: Any) -> dict[str, bool]:
    """Per MatMul/Einsum of a quantized OpenVINO model: whether an input comes through a quantizer."""

    def quantizes(node: Any) -> bool:
        return node.get_type_name() in {"FakeQuantize", "FakeConvert"}

    return {
        op.get_friendly_name(): any(
            quantizes(source.get_node()) or any(quantizes(s.get_node()) for s in source.get_node().input_values())
            for source in op.input_values()
        )
        for op in graph.get_ordered_ops()
        if op.get_type_name() in {"MatMul", "Einsum"}
    }


def test_ops_named_to_keep_in_f32_are_left_unquantized(method_settings, released_prompts, images, tmp_path):
    import openvino

    from anomalib_faprompt.export import quantize_transformer

    model = scoring_model("AnomalyCLIP", method_settings, released_prompts)
    graph = openvino.convert_model(model.to_onnx(tmp_path))
    matmuls = [op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
    kept = matmuls[-3:]  # the last products: the similarity tail

    quantized = quantized_products(quantize_transformer(graph, [images], len(images), keep_f32=kept))
    assert not any(quantized[name] for name in kept)  # without keep_f32 NNCF quantizes them (checked by hand)
    assert sum(quantized.values()) > len(matmuls) // 2  # the encoder's products are quantized


def test_int8_activations_against_a_visual_memory_are_warned_about(method_settings, released_prompts, tiny_mvtec,
                                                                    tmp_path, monkeypatch, caplog):  # fmt: skip
    """PromptAD's memory holds f32 features; INT8_PTQ moved its benchmark scores by 0.2 (weights-only INT8: 0.003)."""
    from anomalib.models.components.base.export_mixin import ExportMixin

    monkeypatch.setattr(ExportMixin, "to_openvino", lambda *args, **kwargs: tmp_path / "model.xml")  # no work
    with_memory = scoring_model("PromptAD", method_settings, released_prompts)
    without = scoring_model("AnomalyCLIP", method_settings, released_prompts)
    exports = [(with_memory, CompressionType.INT8_PTQ), (with_memory, CompressionType.INT8),
               (without, CompressionType.INT8_PTQ)]  # fmt: skip
    for model, compression in exports:
        caplog.clear()
        with caplog.at_level("WARNING", logger="anomalib_faprompt.export"):
            model.to_openvino(tmp_path, compression_type=compression, datamodule=folder_data(tiny_mvtec))
        warned = [record.getMessage() for record in caplog.records if "visual memory" in record.getMessage()]
        if model is with_memory and compression == CompressionType.INT8_PTQ:
            assert warned == [
                "PromptAD: --compression_type INT8_PTQ quantizes the image encoder's activations, but its visual "
                "memory holds the f32 features of 1 reference image(s), so every distance to it carries the rounding "
                "error (on a random CLIP, PromptAD's scores moved by up to 0.2). Compare the exported scores with "
                "torch's on your images, or use --compression_type INT8 (weights only)."
            ]
        else:
            assert warned == [], (model.method_name, compression)
