"""Behaviour of the Lightning modules a user relies on: batching, checkpoints, training guards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_faprompt import AnomalyCLIP, FAPrompt

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}


def make_model(method: str, small_clip, **kwargs):
    extra = {"feature_layers": (2, 4, 6, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_image_scores_do_not_depend_on_the_batch(method, small_clip, released_prompts, anomalyclip_golden):
    model = make_model(method, small_clip, prompt_weights=released_prompts[method]).model.eval()
    images = anomalyclip_golden["inputs"]["images"]
    batch = torch.cat([images, images.flip(-1)[:1]])
    with torch.no_grad():
        together = model(batch)
        for index in range(len(batch)):
            alone = model(batch[index : index + 1])
            torch.testing.assert_close(alone.pred_score, together.pred_score[index : index + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.anomaly_map, together.anomaly_map[index : index + 1], atol=1e-5, rtol=0)


def auxiliary_loaders(root: Path):
    """Train and evaluate on the labelled test split of the tiny category (anomalies with masks)."""
    datamodule = MVTecAD(root=root, category="widget", train_batch_size=3, eval_batch_size=3, num_workers=0)
    datamodule.setup()
    return datamodule.test_dataloader()


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory, small_clip, tiny_mvtec):
    """A model after one epoch of prompt learning, and the checkpoint the engine wrote."""
    method = request.param
    torch.manual_seed(0)
    model = make_model(method, small_clip)
    loader = auxiliary_loaders(tiny_mvtec)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path_factory.mktemp(method), accelerator="cpu", devices=1)
    engine.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    assert checkpoint.is_file()
    return method, model, checkpoint


def test_training_updates_prompts_and_marks_them_ready(trained, small_clip):
    method, model, _ = trained
    torch.manual_seed(0)
    fresh = make_model(method, small_clip)
    assert bool(model.model.prompts_ready)
    assert not bool(fresh.model.prompts_ready)
    learned, initial = model.model.prompt_state_dict(), fresh.model.prompt_state_dict()
    assert learned.keys() == initial.keys()
    # Every trained parameter moved; learned buffers (the few-shot memory, empty here) are not trained.
    trained_names = [name for name, parameter in model.model.named_parameters() if parameter.requires_grad]
    assert trained_names and set(trained_names) <= set(learned)
    assert all(not torch.equal(learned[name], initial[name]) for name in trained_names)
    frozen = model.model.vision.visual.conv1.weight
    torch.testing.assert_close(frozen, fresh.model.vision.visual.conv1.weight, atol=0, rtol=0)


def test_checkpoint_reloads_to_identical_outputs(trained, small_clip, anomalyclip_golden):
    method, model, checkpoint = trained
    # Learned state only: the frozen CLIP is rebuilt from backbone/pretrained, not stored again.
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert not [key for key in state_dict if key.startswith(("model.vision.", "model.text."))]
    assert checkpoint.stat().st_size < Path(small_clip["pretrained"]).stat().st_size / 4
    reloaded = METHODS[method].load_from_checkpoint(checkpoint)
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        before = model.model.eval()(images)
        after = reloaded.model.eval()(images)
    torch.testing.assert_close(after.pred_score, before.pred_score, atol=0, rtol=0)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, atol=0, rtol=0)


def test_saved_prompt_file_reproduces_the_model(trained, small_clip, tmp_path, anomalyclip_golden):
    method, model, checkpoint = trained
    prompt_file = model.save_prompt_weights(tmp_path / "prompts.pt")
    assert prompt_file.stat().st_size < Path(small_clip["pretrained"]).stat().st_size / 10
    images = anomalyclip_golden["inputs"]["images"]
    for source in (prompt_file, checkpoint):
        loaded = make_model(method, small_clip, prompt_weights=source)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.eval()(images).pred_score, model.model.eval()(images).pred_score)


def test_cli_test_with_checkpoint_matches_engine(trained, small_clip, tiny_mvtec, tmp_path):
    method, model, checkpoint = trained
    expected = Engine(default_root_dir=tmp_path / "engine", accelerator="cpu").test(
        model, dataloaders=auxiliary_loaders(tiny_mvtec)
    )[0]
    extra = ["--model.feature_layers", "[2, 4, 6, 8]"] if method == "AnomalyCLIP" else []
    command = [
        str(Path(sys.executable).with_name("anomalib")), "test", "--model", method,
        "--model.backbone", small_clip["backbone"], "--model.pretrained", small_clip["pretrained"],
        "--model.image_size", "224", "--model.dpam_layers", "6", *extra,
        "--data", "MVTecAD", "--data.root", str(tiny_mvtec), "--data.category", "widget",
        "--data.num_workers", "0", "--ckpt_path", str(checkpoint),
        "--default_root_dir", str(tmp_path / "cli"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"image_AUROC\s*│\s*([0-9.]+)", result.stdout + result.stderr)
    assert printed, (result.stdout + result.stderr)[-3000:]
    assert float(printed.group(1)) == pytest.approx(expected["image_AUROC"], abs=1e-4)
