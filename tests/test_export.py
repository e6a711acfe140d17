"""Export to torch, ONNX and OpenVINO: parity with the torch model, loading in a fresh process, refusal.

The exported graphs hold anomalib's exportable pre-processing (resize to ``image_size``, CLIP
normalisation), the model with its image-independent text features as constants (FAPrompt's
per-image DAP path included) and anomalib's post-processor. The reference is the same Lightning
module's forward on the same raw images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import Trainer

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.models.prompt_module import UntrainedPromptsError
from anomalib_faprompt.prompt_weights import load_prompt_weights

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}
TOLERANCE = 1e-3

# Runs in a fresh interpreter: anomalib's inferencers on image paths, onnxruntime on the same arrays.
FRESH_PROCESS = """
import json, sys
import numpy as np
import onnxruntime
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer

openvino_path, onnx_path, torch_path, output, *images = sys.argv[1:]
openvino = OpenVINOInferencer(path=openvino_path, device="CPU")
session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
torch_inferencer = TorchInferencer(path=torch_path, device="cpu")
names = [node.name for node in session.get_outputs()]
results = {"openvino": [], "onnx": [], "torch": []}
for image in images:
    prediction = openvino.predict(image)
    results["openvino"].append((prediction.pred_score.reshape(-1), prediction.anomaly_map.reshape(-1)))
    array = OpenVINOInferencer.pre_process(read_image(image, as_tensor=False))
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: array})))
    results["onnx"].append((outputs["pred_score"].reshape(-1), outputs["anomaly_map"].reshape(-1)))
    prediction = torch_inferencer.predict(image)
    results["torch"].append(
        (prediction.pred_score.detach().numpy().reshape(-1), prediction.anomaly_map.detach().numpy().reshape(-1))
    )
np.savez(output, **{
    f"{backend}_{kind}": np.concatenate([pair[index] for pair in pairs])
    for backend, pairs in results.items() for index, kind in enumerate(("score", "map"))
})
print(json.dumps({"ok": True}))
"""


def make_model(method: str, small_clip, **kwargs):
    extra = {"feature_layers": (2, 4, 6, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, **kwargs)


def model_arguments(method: str, small_clip) -> list[str]:
    arguments = [
        "--model", method, "--model.backbone", small_clip["backbone"], "--model.pretrained", small_clip["pretrained"],
        "--model.image_size", str(small_clip["image_size"]), "--model.dpam_layers", str(small_clip["dpam_layers"]),
    ]  # fmt: skip
    return arguments + (["--model.feature_layers", "[2, 4, 6, 8]"] if method == "AnomalyCLIP" else [])


def write_checkpoint(model, path: Path) -> Path:
    """A Lightning checkpoint of ``model`` as the engine writes it, without training."""
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def anomalib_command() -> str:
    return str(Path(sys.executable).with_name("anomalib"))


@pytest.fixture(scope="module")
def images(tiny_mvtec) -> list[Path]:
    """Two anomalous images and one normal one (64x64; the exported graph resizes them to 224)."""
    category = tiny_mvtec / "widget" / "test"
    return [category / "spot" / "000.png", category / "spot" / "001.png", category / "good" / "000.png"]


# Refusal ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_export_of_untrained_prompts_is_refused(method, small_clip, tmp_path):
    model = make_model(method, small_clip)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    for export_type in ("torch", "onnx", "openvino"):
        with pytest.raises(UntrainedPromptsError, match=rf"{method} cannot export: .*prompt_weights="):
            engine.export(model, export_type=export_type, export_root=tmp_path)
    assert not (tmp_path / "weights").exists()


def test_export_of_an_untrained_checkpoint_is_refused(small_clip, tmp_path):
    checkpoint = write_checkpoint(make_model("FAPrompt", small_clip), tmp_path / "untrained.ckpt")
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    with pytest.raises(UntrainedPromptsError, match="FAPrompt cannot export"):
        engine.export(make_model("FAPrompt", small_clip), export_type="onnx", ckpt_path=checkpoint)


# Exports of a model whose prompts were loaded (as after training) ------------------------------------------------


@pytest.fixture(scope="module", params=list(METHODS))
def exported(request, tmp_path_factory, small_clip, released_prompts, images):
    """Per method: the checkpointed model and its torch, ONNX (Engine) and OpenVINO (CLI) exports."""
    method = request.param
    root = tmp_path_factory.mktemp(f"export_{method}")
    model = make_model(method, small_clip)
    load_prompt_weights(model.model, released_prompts[method], method)  # as if trained: prompt_weights stays None
    checkpoint = write_checkpoint(model, root / "model.ckpt")

    command = [
        anomalib_command(), "export", *model_arguments(method, small_clip), "--ckpt_path", str(checkpoint),
        "--export_type", "openvino", "--export_root", str(root / "cli"), "--default_root_dir", str(root / "cli"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    engine = Engine(default_root_dir=root, accelerator="cpu", logger=False)
    paths = {
        "openvino": root / "cli" / "weights" / "openvino" / "model.xml",
        "onnx": engine.export(model, export_type="onnx", export_root=root / "engine", ckpt_path=checkpoint),
        "torch": engine.export(model, export_type="torch", export_root=root / "engine", ckpt_path=checkpoint),
    }
    assert all(path.is_file() for path in paths.values()), paths
    reference = METHODS[method].load_from_checkpoint(checkpoint).eval()
    return method, reference, paths


def torch_outputs(model, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        output = model(batch)
    return output.pred_score.numpy(), output.anomaly_map.numpy()


def max_differences(expected: tuple[np.ndarray, np.ndarray], actual: tuple[np.ndarray, np.ndarray]) -> list[float]:
    return [float(np.abs(np.asarray(a).reshape(e.shape) - e).max()) for e, a in zip(expected, actual, strict=True)]


@pytest.mark.slow
def test_onnx_and_openvino_match_torch_on_a_batch(exported, images):
    """Dynamic batch: three images of one batch through onnxruntime and OpenVINO against torch."""
    import onnxruntime
    import openvino

    _, model, paths = exported
    batch = torch.stack([read_image(path, as_tensor=True) for path in images])
    expected = torch_outputs(model, batch)
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_outputs()]
    onnx = dict(zip(names, session.run(None, {"input": batch.numpy()}), strict=True))
    compiled = openvino.Core().compile_model(str(paths["openvino"]), "CPU")
    ov = {next(iter(port.names)): value for port, value in compiled(batch.numpy()).items()}
    for backend, outputs in (("onnx", onnx), ("openvino", ov)):
        differences = max_differences(expected, (outputs["pred_score"], outputs["anomaly_map"]))
        assert max(differences) < TOLERANCE, (backend, differences)


@pytest.mark.slow
def test_exports_load_and_match_torch_in_a_fresh_process(exported, images, tmp_path):
    """OpenVINOInferencer and TorchInferencer on image paths, and onnxruntime, in a new interpreter."""
    _, model, paths = exported
    output = tmp_path / "outputs.npz"
    command = [
        sys.executable, "-c", FRESH_PROCESS, str(paths["openvino"]), str(paths["onnx"]), str(paths["torch"]),
        str(output), *map(str, images),
    ]  # fmt: skip
    # TorchInferencer unpickles the exported module, which anomalib allows only when asked to.
    env = {**os.environ, "TRUST_REMOTE_CODE": "1"}
    # cwd: OpenVINOInferencer writes its compiled-model cache to ./openvino_cache.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ok": True}

    loaded = np.load(output)
    expected = [torch_outputs(model, read_image(path, as_tensor=True)[None]) for path in images]
    expected = (np.concatenate([s for s, _ in expected]), np.concatenate([m.reshape(-1) for _, m in expected]))
    for backend in ("openvino", "onnx", "torch"):
        differences = max_differences(expected, (loaded[f"{backend}_score"], loaded[f"{backend}_map"]))
        assert max(differences) < TOLERANCE, (backend, differences)
    # One map per image at the model's input size.
    assert loaded["openvino_map"].size == len(images) * model.model.image_size**2


@pytest.mark.slow
def test_static_text_is_constant_and_dap_is_in_the_graph(exported, images):
    """AnomalyCLIP's graph runs no text encoder; FAPrompt's runs TopK, the prior network and the text encoder."""
    import onnx

    method, model, paths = exported
    graph = onnx.load(str(paths["onnx"])).graph
    weights = {initializer.name for initializer in graph.initializer}
    text_weights = {name for name in weights if name.startswith("model.text.")}
    if method == "AnomalyCLIP":
        # Image-independent text features are constants: no text weights, no prompt parameters.
        assert not text_weights
        assert not {"model.normal_context", "model.abnormal_context"} & weights
        return
    operators = {node.op_type for node in graph.node}
    assert "TopK" in operators, sorted(operators)
    # The prior network and the abnormal prompt template the per-image offsets are added to (its learned context may
    # be folded into a constant by the exporter, which is fine: it does not depend on the image).
    assert {"model.prior.0.weight", "model.prior.2.weight", "model.abnormal_template.prefix"} <= weights
    assert any(name.startswith("model.text.resblocks.") for name in text_weights)
    batch = torch.stack([read_image(path, as_tensor=True) for path in images])
    with torch.no_grad():
        dap_text = model.model.forward_features(model.pre_processor(batch)).dap_text
    # Per-image abnormal text, so a graph with DAP frozen at export time could not match torch on these images.
    assert (dap_text[0, 1] - dap_text[1, 1]).abs().max() > 1e-4
