"""Exported models on the inspection line: the engine's scores on full-size images, untrusted outputs anomalous.

For every method of the method list (small CLIPs, prompts as if trained): the ONNX graph in ONNX Runtime and in
OpenVINO (f32) and the ``torch`` export in anomalib's ``TorchInferencer`` give ``anomalib predict``'s scores and maps
to 1e-3 on images that are not at the model's size (700×500 and 1024×1024: the graph resizes them as the engine's
pre-processor does, antialiased); a NaN or infinite pixel comes out labelled anomalous everywhere; compression that
needs a missing package is refused before any work; odd inputs get an error naming the shape.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from PIL import Image

from anomalib_faprompt.methods import METHODS
from anomalib_faprompt.prompt_weights import load_prompt_weights

TOLERANCE = 1e-3
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}
#: Full-size images (width, height): not square, and larger than the model's input, as on an inspection line.
SIZES = ((700, 500), (1024, 1024))


def scoring_model(method: str, method_settings: dict, released_prompts: dict) -> Any:
    """The method's Lightning module, able to score: released prompts loaded, or PromptAD with a 1-image memory."""
    model_class = METHODS[method].load()
    if method in released_prompts:
        model = model_class(**method_settings[method])
        load_prompt_weights(model.model, released_prompts[method], method)  # as if trained
        return model.eval()
    model = model_class(**method_settings[method], allow_untrained_prompts=True).eval()
    size = model.model.image_size
    model.model.add_references(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of full-size RGB images with structure at every scale (resizing them is not trivial)."""
    folder = tmp_path_factory.mktemp("full_size")
    generator = np.random.default_rng(0)
    for width, height in SIZES:
        noise = generator.normal(128, 40, (-(-height // 8), -(-width // 8), 3))
        coarse = np.kron(noise, np.ones((8, 8, 1)))[:height, :width]
        fine = generator.normal(0, 25, (height, width, 3))
        image = np.clip(coarse + fine, 0, 255).astype("uint8")
        Image.fromarray(image).save(folder / f"{width}x{height}.png")
    return folder


@pytest.fixture(scope="module", params=list(METHODS))
def exported(request, tmp_path_factory, method_settings, released_prompts, images) -> dict[str, Any]:
    """Per method: the model, the engine's predictions on the full-size images, its ONNX and torch exports."""
    import onnxruntime
    import openvino

    method = request.param
    root = tmp_path_factory.mktemp(f"fidelity_{method}")
    model = scoring_model(method, method_settings, released_prompts)
    engine = Engine(default_root_dir=root, accelerator="cpu", logger=False)
    predictions = {Path(batch.image_path[0]).name: batch for batch in engine.predict(model, data_path=images)}
    onnx_path = model.to_onnx(root / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compiled = openvino.Core().compile_model(openvino.convert_model(onnx_path), "CPU", OPENVINO_F32)

    def run_onnx(batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch}), strict=True))

    def run_openvino(batch: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled(batch)
        return {output.get_any_name(): result[output] for output in compiled.outputs}

    return {"method": method, "model": model, "predictions": predictions, "onnx": run_onnx, "openvino": run_openvino,
            "torch": model.to_torch(root / "torch")}  # fmt: skip


def raw_image(path: Path) -> np.ndarray:
    """An image as the inferencers feed it: (1, 3, H, W) float32 in [0, 1], at its own size."""
    return (np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).transpose(2, 0, 1)[None]


def test_exports_give_the_engines_scores_on_full_size_images(exported, images, monkeypatch):
    from anomalib.deploy import TorchInferencer

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib unpickles a torch export only when asked to
    inferencer = TorchInferencer(path=exported["torch"], device="cpu")
    for path in sorted(images.iterdir()):
        engine = exported["predictions"][path.name]
        expected = {"pred_score": engine.pred_score.numpy().reshape(-1), "anomaly_map": engine.anomaly_map.numpy()}
        result = inferencer.predict(str(path))  # FAPrompt's outputs used to require grad: .numpy() failed
        outputs = {
            "onnx": exported["onnx"](raw_image(path)),
            "openvino": exported["openvino"](raw_image(path)),
            "torch": {
                "pred_score": result.pred_score,
                "anomaly_map": result.anomaly_map,
                "pred_label": result.pred_label,
            },
        }
        for backend, output in outputs.items():
            for name, reference in expected.items():
                difference = np.abs(np.asarray(output[name]).reshape(reference.shape) - reference).max()
                assert difference < TOLERANCE, (exported["method"], path.name, backend, name, float(difference))
            labels = np.asarray(output["pred_label"]).reshape(-1)
            assert labels.tolist() == engine.pred_label.numpy().reshape(-1).tolist(), (path.name, backend)


def test_a_non_finite_input_is_labelled_anomalous_in_torch_and_the_exports(exported):
    size = exported["model"].model.image_size
    batch = torch.rand(3, 3, size + 30, size + 10, generator=torch.Generator().manual_seed(1))
    batch[1, 0, 5, 5] = float("nan")
    batch[2, 2, 9, 9] = float("inf")
    with torch.no_grad():
        reference = exported["model"](batch)
    outputs = {"torch": {name: getattr(reference, name).numpy() for name in ("pred_score", "pred_label", "pred_mask")},
               "onnx": exported["onnx"](batch.numpy()), "openvino": exported["openvino"](batch.numpy())}  # fmt: skip
    for backend, output in outputs.items():
        scores, labels = np.asarray(output["pred_score"]).reshape(-1), np.asarray(output["pred_label"]).reshape(-1)
        assert np.isfinite(scores[0]) and np.isnan(scores[1:]).all(), (backend, scores)
        assert labels[1:].all(), (backend, labels)  # never "normal"
        assert labels[0] == reference.pred_label[0].item(), backend
        masks = np.asarray(output["pred_mask"]).reshape(3, -1)
        assert masks[1:].any(axis=1).all(), backend


def test_compression_whose_package_is_missing_is_refused_before_any_work(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    traced = []
    monkeypatch.setattr(type(exported["model"]), "to_onnx", lambda *args, **kwargs: traced.append(1))
    for compression in (CompressionType.INT8, CompressionType.INT8_PTQ):
        with pytest.raises(ModuleNotFoundError, match=r"needs the package 'nncf'.*anomalib-faprompt\[export\]"):
            exported["model"].to_openvino(tmp_path, compression_type=compression)
    assert traced == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_images_are_scored_as_float(exported, dtype):
    model = exported["model"]
    size = model.model.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, cast = model.model(images), model.model(images.to(dtype))
        lightning_expected, lightning_cast = model(images), model(images.to(dtype))
    tolerance = 1e-2 if dtype == torch.float16 else 1e-6  # the input's own rounding (float16: 5e-4 of a pixel)
    for output, reference in ((cast, expected), (lightning_cast, lightning_expected)):
        assert output.pred_score.dtype == torch.float32
        torch.testing.assert_close(output.pred_score, reference.pred_score, atol=tolerance, rtol=0)


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((0, 3, 64, 64), torch.float32, r"got an empty batch, shape \(0, 3, 64, 64\)"),
        ((2, 1, 64, 64), torch.float32, r"got shape \(2, 1, 64, 64\). Convert greyscale images to RGB"),
        ((2, 4, 64, 64), torch.float32, r"got shape \(2, 4, 64, 64\). .*drop an alpha channel"),
        ((3, 64, 64), torch.float32, r"got shape \(3, 64, 64\). For one image, add the batch dimension"),
        ((1, 3, 64, 64), torch.uint8, r"got torch.uint8 pixels of shape \(1, 3, 64, 64\). Scale them to \[0, 1\]"),
    ],
)
def test_odd_inputs_are_refused_naming_the_shape(exported, shape, dtype, expected):
    model = exported["model"]
    images = torch.zeros(shape, dtype=dtype)
    for module in (model, model.model):  # the Lightning module (raw images) and the torch model
        with pytest.raises(ValueError, match=r"expects float images of shape \(B, 3, H, W\).*" + expected):
            module(images)


@pytest.mark.parametrize(
    ("export_type", "compression", "expected"),
    [
        ("openvino", "INT8_PTQ", "error: FAPrompt: OpenVINO compression INT8_PTQ needs the package 'nncf', which is "
         'not installed. Install it with pip install "anomalib-faprompt[export]" (or pip install nncf), or export '
         "without --compression_type (FP16 needs nothing more)."),
        ("onnx", "FP16", "error: FAPrompt: --compression_type FP16 applies to --export_type openvino only; anomalib "
         "writes the onnx export in f32 without it. Export to OpenVINO, or leave --compression_type out."),
    ],
)  # fmt: skip
def test_anomalib_export_refuses_a_compression_that_would_not_happen_in_one_line(
    small_clip, released_prompts, tmp_path, capsys, monkeypatch, export_type, compression, expected
):
    from anomalib.cli.cli import AnomalibCLI

    from test_export import write_checkpoint

    model = scoring_model("FAPrompt", {"FAPrompt": small_clip}, released_prompts)
    checkpoint = write_checkpoint(model, tmp_path / "model.ckpt")
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    arguments = ["export", "--model", "FAPrompt", "--ckpt_path", str(checkpoint), "--export_type", export_type,
                 "--compression_type", compression, "--export_root", str(tmp_path / "exports")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        AnomalibCLI(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1] == expected
    assert not (tmp_path / "exports").exists()
