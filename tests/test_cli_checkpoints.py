"""Checkpoints rebuild their model: ``anomalib test|predict|export --model M --ckpt_path X``, ``load_from_checkpoint``.

One FAPrompt and one AnomalyCLIP are trained once (module fixture) on the small CLIP with non-default settings;
the CLI then gets only ``--model`` and ``--ckpt_path`` (plus the data and the export type) and must rebuild the
model the checkpoint was trained with. A setting given on the command line or in a config file that contradicts
the checkpoint is refused, naming it; ``pretrained`` may point elsewhere (moved weights).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.cli.cli import AnomalibCLI
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import Trainer

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.clip import WeightsNotFoundError
from anomalib_faprompt.data import AuxiliaryDataModule
from anomalib_faprompt.prompt_weights import SettingsMismatchError

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}
#: Non-default settings of the trained models (besides the small CLIP's backbone, weights, image size, DPAM layers).
TRAINED_WITH = {
    "FAPrompt": {"n_abnormal_prompts": 4, "n_prior_patches": 6, "text_depth": 5, "sigma": 4.0},
    "AnomalyCLIP": {"feature_layers": [2, 4, 6, 8], "n_ctx": 8, "text_depth": 5, "sigma": 2.0},
}
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)


def data_arguments(root: Path) -> list[str]:
    return ["--data", "MVTecAD", "--data.root", str(root), "--data.category", "widget", "--data.num_workers", "0"]


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory, small_clip, tiny_mvtec) -> dict:
    """A model trained one epoch with non-default settings: its checkpoint, settings and test metrics."""
    method = request.param
    root = tmp_path_factory.mktemp(f"trained_{method}")
    settings = {**small_clip, **TRAINED_WITH[method]}
    model = METHODS[method](**settings)
    datamodule = AuxiliaryDataModule(auxiliary=[mvtec(tiny_mvtec)], target=mvtec(tiny_mvtec), num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=root, accelerator="cpu", logger=False)
    engine.fit(model, datamodule=datamodule)
    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert checkpoint.is_file()
    (metrics,) = engine.test(model, datamodule=datamodule)
    return {"method": method, "checkpoint": checkpoint, "settings": settings, "metrics": metrics, "model": model}


def assert_rebuilt(model, trained: dict) -> None:
    """``model`` has every setting the checkpoint was trained with."""
    assert type(model).__name__ == trained["method"]
    for name, value in trained["settings"].items():
        expected = str(Path(value).resolve()) if name in ("backbone", "pretrained") else value  # files: absolute
        assert model.hparams[name] == expected, name


def cli(arguments: list[str], run: bool = True) -> AnomalibCLI:
    return AnomalibCLI(arguments, run=run)


def refusal(capsys, arguments: list[str]) -> str:
    """The last line of stderr of a CLI call that must exit with an error before building anything."""
    with pytest.raises(SystemExit) as exit_info:
        cli(arguments, run=False)
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1]


# The CLI rebuilds the model from --ckpt_path -------------------------------------------------------------------


def test_cli_test_with_only_model_and_ckpt_path_reproduces_the_training_runs_test(trained, tiny_mvtec, tmp_path):
    method, checkpoint = trained["method"], trained["checkpoint"]
    arguments = ["test", "--model", method, "--ckpt_path", str(checkpoint), *data_arguments(tiny_mvtec)]
    run = cli([*arguments, "--default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert_rebuilt(run.model, trained)
    metrics = {name: float(value) for name, value in run.engine.trainer.callback_metrics.items()}
    assert set(trained["metrics"]) <= set(metrics)
    for name, value in trained["metrics"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_cli_validate_rebuilds_the_model(trained, tiny_mvtec, tmp_path):
    arguments = ["validate", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    run = cli([*arguments, *data_arguments(tiny_mvtec), "--default_root_dir", str(tmp_path)], run=False)
    assert_rebuilt(run.model, trained)


def test_cli_predict_with_only_model_and_ckpt_path_writes_the_images(trained, tiny_mvtec, tmp_path):
    folder = tiny_mvtec / "widget" / "test" / "spot"
    arguments = ["predict", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    run = cli([*arguments, "--data", str(folder), "--default_root_dir", str(tmp_path)])
    assert_rebuilt(run.model, trained)
    written = sorted(path.name for path in tmp_path.rglob("*.png") if "images" in path.parts)
    assert written == sorted(path.name for path in folder.glob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["FAPrompt"], indirect=True)  # the CLI path is the same for both methods
def test_cli_export_with_only_model_and_ckpt_path_matches_torch(trained, tiny_mvtec, tmp_path):
    import onnxruntime

    arguments = ["export", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    cli([*arguments, "--export_type", "onnx", "--export_root", str(tmp_path), "--default_root_dir", str(tmp_path)])
    exported = tmp_path / "weights" / "onnx" / "model.onnx"
    assert exported.is_file()
    images = [tiny_mvtec / "widget" / "test" / name / "000.png" for name in ("spot", "good")]
    batch = torch.stack([read_image(path, as_tensor=True) for path in images])
    model = trained["model"].eval()
    with torch.no_grad():
        expected = model(batch)
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.numpy().reshape(-1), atol=1e-3)
    np.testing.assert_allclose(outputs["anomaly_map"].reshape(-1), expected.anomaly_map.numpy().reshape(-1), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["FAPrompt"], indirect=True)  # the in-process tests cover both methods
def test_cli_test_in_a_fresh_process(trained, tiny_mvtec, tmp_path):
    """As a user types it: a new interpreter, only --model, --ckpt_path and the data."""
    command = [ANOMALIB, "test", "--model", "FAPrompt", "--ckpt_path", str(trained["checkpoint"])]
    command += [*data_arguments(tiny_mvtec), "--default_root_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for name in ("image_AUROC", "pixel_AUROC"):
        assert str(trained["metrics"][name])[:7] in result.stdout, (name, result.stdout[-3000:])


# Given settings: the checkpoint's, or refused --------------------------------------------------------------------


def test_contradicting_command_line_setting_is_refused_naming_it(trained, tiny_mvtec, capsys):
    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    line = refusal(capsys, [*arguments, "--model.image_size", "448", *data_arguments(tiny_mvtec)])
    assert "image_size" in line
    assert "224" in line
    assert "448" in line


def test_a_given_default_value_that_contradicts_the_checkpoint_is_refused(trained, tiny_mvtec, capsys):
    """518 is the class default: given explicitly it is still a contradiction, not a default to replace."""
    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    line = refusal(capsys, [*arguments, "--model.init_args.image_size", "518", *data_arguments(tiny_mvtec)])
    assert "image_size" in line
    assert "518" in line


def test_contradicting_config_file_setting_is_refused_naming_it(trained, tiny_mvtec, tmp_path, capsys):
    name = "text_depth"
    config = {"model": {"class_path": trained["method"], "init_args": {name: 9}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    line = refusal(capsys, ["test", "--config", str(path), "--ckpt_path", str(trained["checkpoint"])])
    assert name in line
    assert "5" in line
    assert "9" in line


def test_settings_equal_to_the_checkpoints_are_accepted(trained, tiny_mvtec, tmp_path):
    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    arguments += ["--model.image_size", "224", "--model.text_depth", "5", *data_arguments(tiny_mvtec)]
    run = cli([*arguments, "--default_root_dir", str(tmp_path)], run=False)
    assert_rebuilt(run.model, trained)


def test_inference_compile_is_a_run_time_choice_not_taken_from_or_checked_against_the_checkpoint(
    trained, tiny_mvtec, tmp_path
):
    """A checkpoint trained eagerly tests compiled with the flag alone, and without the flag runs eagerly."""
    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    arguments += [*data_arguments(tiny_mvtec), "--default_root_dir", str(tmp_path)]
    compiled = cli([*arguments, "--model.inference_compile", "default"], run=False).model
    assert_rebuilt(compiled, trained)
    assert compiled.model.compiled_vision.mode == "default"
    assert cli(arguments, run=False).model.model.compiled_vision is None


def test_normal_fpr_may_be_chosen_at_test_time_for_a_checkpoint_trained_without_it(trained, tiny_mvtec, tmp_path):
    """Thresholds from normal images are a test-time choice: the prompts do not depend on them."""
    from anomalib_faprompt.post_processing import NormalFPRPostProcessor

    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    arguments += [*data_arguments(tiny_mvtec), "--default_root_dir", str(tmp_path), "--model.normal_fpr", "0.25"]
    model = cli(arguments, run=False).model
    assert_rebuilt(model, trained)
    assert isinstance(model.post_processor, NormalFPRPostProcessor)
    assert model.post_processor.normal_fpr == 0.25


def test_a_model_of_the_other_method_is_refused(trained, tiny_mvtec, capsys):
    other = next(method for method in METHODS if method != trained["method"])
    line = refusal(capsys, ["test", "--model", other, "--ckpt_path", str(trained["checkpoint"])])
    assert trained["method"] in line
    assert other in line


def test_moved_clip_weights_are_accepted(trained, tiny_mvtec, tmp_path):
    moved = tmp_path / "elsewhere" / "weights.pt"
    moved.parent.mkdir()
    shutil.copy(trained["settings"]["pretrained"], moved)
    arguments = ["test", "--model", trained["method"], "--ckpt_path", str(trained["checkpoint"])]
    arguments += ["--model.pretrained", str(moved), *data_arguments(tiny_mvtec), "--default_root_dir", str(tmp_path)]
    run = cli(arguments)
    assert run.model.hparams["pretrained"] == str(moved)
    assert float(run.engine.trainer.callback_metrics["image_AUROC"]) == pytest.approx(
        trained["metrics"]["image_AUROC"], abs=1e-6
    )


# Python ---------------------------------------------------------------------------------------------------------


def test_load_from_checkpoint_rebuilds_with_no_arguments(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = METHODS[trained["method"]].load_from_checkpoint(trained["checkpoint"])
    assert_rebuilt(model, trained)
    images = torch.stack([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)])
    with torch.no_grad():
        expected = trained["model"].eval()(images)
        reloaded = model.eval()(images)
    torch.testing.assert_close(reloaded.pred_score, expected.pred_score, atol=0, rtol=0)
    torch.testing.assert_close(reloaded.anomaly_map, expected.anomaly_map, atol=0, rtol=0)


def test_checkpoints_record_files_by_absolute_path_and_reload_from_another_directory(small_clip, tmp_path, monkeypatch):
    golden = Path(small_clip["backbone"]).parent
    monkeypatch.chdir(golden.parent)
    relative = {"backbone": f"{golden.name}/clip_small.json", "pretrained": f"{golden.name}/clip_small_seed0.pt"}
    model = FAPrompt(**{**small_clip, **relative}, allow_untrained_prompts=True)
    assert model.hparams["backbone"] == str(Path(small_clip["backbone"]).resolve())
    assert model.hparams["pretrained"] == str(Path(small_clip["pretrained"]).resolve())
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    reloaded = FAPrompt.load_from_checkpoint("model.ckpt")
    assert reloaded.hparams["backbone"] == model.hparams["backbone"]


def test_engine_with_a_model_of_other_settings_refuses_the_checkpoint_naming_them(trained, tiny_mvtec):
    method = trained["method"]
    other = {"FAPrompt": {"n_abnormal_prompts": 10}, "AnomalyCLIP": {"n_ctx": 12}}
    model = METHODS[method](**{**trained["settings"], **other[method]})
    (name,) = other[method]
    engine = Engine(accelerator="cpu", logger=False)
    with pytest.raises(SettingsMismatchError, match=rf"{name} is \d+ there and \d+ here"):
        engine.test(model, datamodule=mvtec(tiny_mvtec), ckpt_path=trained["checkpoint"])


# Offline: a tag that needs a download fails in seconds, with the message last -----------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path) -> dict[str, str]:
    """No network for the hub, deterministically (a closed local port), an empty cache, HF_HUB_OFFLINE unset."""
    import huggingface_hub.constants

    environment = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", environment["HF_ENDPOINT"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return environment


def test_offline_tag_fails_within_seconds_with_the_advice(unreachable_hub):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        FAPrompt(pretrained="openai")
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f} s"
    message = str(error.value)
    assert "https://openaipublic.azureedge.net/clip/models/" in message
    assert "ViT-L-14-336px.pt" in message
    assert "pretrained=/path/to/that/file" in message
    assert "--model.pretrained /path/to/that/file" in message


def test_cached_hub_weights_are_used_without_network(unreachable_hub, tmp_path):
    from anomalib_faprompt.clip.loading import _download_tag

    snapshot = Path(unreachable_hub["HF_HOME"]) / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    cached = snapshot / "snapshots" / commit / "open_clip_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    start = time.monotonic()
    assert Path(_download_tag("ViT-B-16", "openai", None)) == cached
    assert time.monotonic() - start < 1


def test_a_server_that_does_not_answer_counts_as_unreachable_after_the_timeout():
    """A firewall that drops packets: the connection opens (kernel backlog) but no HTTP answer ever comes."""
    import socket

    from anomalib_faprompt.clip.loading import _unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        reason = _unreachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.5)
        elapsed = time.monotonic() - start
    assert reason is not None
    assert elapsed < 2


def test_a_server_that_answers_with_an_error_status_counts_as_reachable():
    import http.server
    import threading

    from anomalib_faprompt.clip.loading import _unreachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), NotFound) as server:
        thread = threading.Thread(target=server.handle_request, daemon=True)
        thread.start()
        assert _unreachable(f"http://127.0.0.1:{server.server_address[1]}", timeout=5) is None
        thread.join(5)


@pytest.mark.slow
def test_offline_cli_ends_with_the_advice(unreachable_hub, tiny_mvtec, tmp_path):
    environment = {**os.environ, **unreachable_hub}
    environment.pop("HF_HUB_OFFLINE", None)
    command = [ANOMALIB, "test", "--model", "FAPrompt", *data_arguments(tiny_mvtec)]
    command += ["--default_root_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=environment)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "pretrained=/path/to/that/file" in lines[-1], result.stderr[-3000:]
    assert "--model.pretrained /path/to/that/file" in lines[-1]
    assert "ViT-L-14-336px.pt" in lines[-1]
    assert "Retrying" not in result.stderr
    assert "Does not validate against any of the Union subtypes" not in result.stderr
