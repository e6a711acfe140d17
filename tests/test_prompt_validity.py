"""Prompts are checked, not assumed: trained only after an optimiser step, finite, learned with these settings.

Also: non-finite inputs or outputs raise instead of being scored, and checkpoints of models built from
YAML (OmegaConf containers in the hyper-parameters) reload.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import ImageBatch, ImageItem, MVTecAD
from anomalib.engine import Engine
from anomalib.models import get_model
from lightning.pytorch import Callback
from omegaconf import ListConfig
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.models.readiness import UntrainedPromptsError
from anomalib_faprompt.prompt_weights import NonFiniteValuesError, SettingsMismatchError

LAYERS = (2, 4, 6, 8)


def anomaly_clip(small_clip, **kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(**{**small_clip, "feature_layers": LAYERS, **kwargs})


def labelled_loader(root: Path, batch_size: int = 3) -> DataLoader:
    """The labelled test split of the tiny category (3 normal, 3 anomalous images with masks)."""
    datamodule = MVTecAD(root=root, category="widget", train_batch_size=3, eval_batch_size=batch_size, num_workers=0)
    datamodule.setup()
    return datamodule.test_dataloader()


def engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, **kwargs)


# Trained only after an optimiser step -----------------------------------------------------------------------------


class RecordPromptsReady(Callback):
    """Whether the prompts count as trained before each training batch and at the end of training."""

    def __init__(self) -> None:
        self.states: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append(bool(pl_module.model.prompts_ready))

    def on_train_end(self, trainer, pl_module) -> None:
        self.states.append(bool(pl_module.model.prompts_ready))


@pytest.fixture(scope="module")
def yaml_fit(tmp_path_factory, small_clip, tiny_mvtec):
    """AnomalyCLIP built from YAML as ``anomalib zero_shot`` builds it, fitted for one epoch.

    The epoch has two batches and gradients accumulate over both: one optimiser step, after the second.
    """
    config = yaml.safe_load(
        f"""
        class_path: AnomalyCLIP
        init_args:
          backbone: {small_clip["backbone"]}
          pretrained: {small_clip["pretrained"]}
          image_size: {small_clip["image_size"]}
          dpam_layers: {small_clip["dpam_layers"]}
          feature_layers: [2, 4, 6, 8]
        """
    )
    torch.manual_seed(0)
    model = get_model(config)
    recorder = RecordPromptsReady()
    loader = labelled_loader(tiny_mvtec)
    run = engine(tmp_path_factory.mktemp("yaml_fit"), max_epochs=1, accumulate_grad_batches=2, callbacks=[recorder])
    run.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    callback = run.trainer.checkpoint_callback
    checkpoint = Path(callback.best_model_path or callback.last_model_path)
    assert checkpoint.is_file()
    return model, checkpoint, recorder.states


def test_prompts_count_as_trained_only_after_an_optimiser_step(yaml_fit):
    model, _, states = yaml_fit
    # Before the second batch the first had only accumulated gradients: the prompts were still the initial ones.
    assert states == [False, False, True]
    assert bool(model.model.prompts_ready)


def test_fit_without_an_optimiser_step_leaves_prompts_untrained(small_clip, tiny_mvtec, tmp_path):
    model = anomaly_clip(small_clip)
    loader = labelled_loader(tiny_mvtec)
    engine(tmp_path, max_epochs=0).fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert not bool(model.model.prompts_ready)
    with pytest.raises(UntrainedPromptsError, match=r"no optimiser step.*allow_untrained_prompts=True"):
        model.save_prompt_weights(tmp_path / "prompts.pt")
    assert not (tmp_path / "prompts.pt").exists()
    # Testing after such a fit (``anomalib train --trainer.max_epochs 0``) says why the prompts are untrained.
    with pytest.raises(UntrainedPromptsError, match=r"cannot test.*0 optimiser steps \(max_epochs=0\)"):
        engine(tmp_path, max_epochs=0).test(model, dataloaders=loader)


def test_a_skipped_amp_step_does_not_train_the_prompts(small_clip):
    """GradScaler skips ``optimizer.step()`` when a gradient is not finite: nothing was learned."""
    model = anomaly_clip(small_clip)
    optimizer = model.configure_optimizers()
    model._watch_optimizer_steps([optimizer])
    scaler = torch.amp.GradScaler("cpu")
    before = {name: value.clone() for name, value in model.model.prompt_state_dict().items()}
    scaler.scale((model.model.normal_context * math.inf).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    after = model.model.prompt_state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not bool(model.model.prompts_ready)
    optimizer.zero_grad()
    scaler.scale(model.model.normal_context.square().sum()).backward()
    scaler.step(optimizer)
    assert bool(model.model.prompts_ready)


def test_untrained_prompts_saved_explicitly_stay_untrained(small_clip, tmp_path):
    model = FAPrompt(**small_clip, allow_untrained_prompts=True)
    path = model.save_prompt_weights(tmp_path / "untrained.pt")
    assert torch.load(path, weights_only=True)["trained"] is False
    with pytest.raises(UntrainedPromptsError, match=r"untrained\.pt.*untrained prompts.*allow_untrained_prompts=True"):
        FAPrompt(**small_clip, prompt_weights=path)
    reloaded = FAPrompt(**small_clip, prompt_weights=path, allow_untrained_prompts=True)
    assert not bool(reloaded.model.prompts_ready)
    saved = model.model.prompt_state_dict()
    assert all(torch.equal(value, reloaded.model.prompt_state_dict()[name]) for name, value in saved.items())


# Finite prompt values ---------------------------------------------------------------------------------------------


def test_non_finite_released_prompts_are_refused(small_clip, released_prompts, tmp_path):
    content = torch.load(released_prompts["AnomalyCLIP"], weights_only=True)
    content["prompt_learner"]["ctx_neg"].view(-1)[3] = math.nan
    torch.save(content, tmp_path / "nan.pth")
    with pytest.raises(NonFiniteValuesError, match=r"nan\.pth.*abnormal_context.*1 non-finite"):
        anomaly_clip(small_clip, prompt_weights=tmp_path / "nan.pth")


def test_non_finite_prompts_are_refused_on_save_and_on_load(small_clip, released_prompts, tmp_path):
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])
    path = model.save_prompt_weights(tmp_path / "prompts.pt")
    with torch.no_grad():
        model.model.prior[0].weight[0, :2] = math.inf
    with pytest.raises(NonFiniteValuesError, match=r"prior\.0\.weight.*2 non-finite.*nan_prompts\.pt"):
        model.save_prompt_weights(tmp_path / "nan_prompts.pt")
    assert not (tmp_path / "nan_prompts.pt").exists()
    content = torch.load(path, weights_only=True)
    content["state_dict"]["deep_prompts.0"][0, 0] = math.nan
    torch.save(content, tmp_path / "tampered.pt")
    with pytest.raises(NonFiniteValuesError, match=r"tampered\.pt.*deep_prompts\.0"):
        FAPrompt(**small_clip, prompt_weights=tmp_path / "tampered.pt")


def test_non_finite_lightning_checkpoint_is_refused(yaml_fit, small_clip, tmp_path):
    _, checkpoint, _ = yaml_fit
    content = torch.load(checkpoint, weights_only=False)
    content["state_dict"]["model.normal_context"][0, 0] = math.nan
    torch.save(content, tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteValuesError, match=r"nan\.ckpt.*normal_context"):
        anomaly_clip(small_clip, prompt_weights=tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteValuesError, match=r"normal_context"):
        AnomalyCLIP.load_from_checkpoint(tmp_path / "nan.ckpt")


# Non-finite inputs and outputs raise ------------------------------------------------------------------------------


def poison_first_image(image: torch.Tensor) -> torch.Tensor:
    """A faulty transform: the first image of the batch gets an infinite pixel."""
    image = image.clone()
    image[0, 0, 5, 5] = math.inf
    return image


def test_non_finite_input_raises_naming_the_images(small_clip, released_prompts, tiny_mvtec, tmp_path):
    model = anomaly_clip(small_clip, prompt_weights=released_prompts["AnomalyCLIP"])
    transform = v2.Compose([model.pre_processor.transform, v2.Lambda(poison_first_image, tv_tensors.Image)])
    model.pre_processor.transform = transform
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=3, num_workers=0)
    with pytest.raises(ValueError, match=r"input image.*non-finite.*test/good/000\.png"):
        engine(tmp_path).test(model, datamodule=datamodule)


class NanImages(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> ImageItem:
        image = torch.full((3, 224, 224), 0.5)
        if index == 1:
            image[:, 10:12, 10:12] = math.nan
        return ImageItem(image=tv_tensors.Image(image), image_path=f"frame_{index}.png")


def test_predict_refuses_a_nan_image(small_clip, released_prompts, tmp_path):
    # No visualiser: the frames exist in memory only.
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"], visualizer=False)
    loader = DataLoader(NanImages(), batch_size=2, collate_fn=ImageBatch.collate)
    with pytest.raises(ValueError, match=r"non-finite.*frame_1\.png") as error:
        engine(tmp_path).predict(model, dataloaders=loader)
    assert "frame_0.png" not in str(error.value)


def test_non_finite_outputs_raise_instead_of_being_labelled_normal(small_clip, released_prompts, tiny_mvtec, tmp_path):
    model = anomaly_clip(small_clip, prompt_weights=released_prompts["AnomalyCLIP"])
    with torch.no_grad():
        model.model.abnormal_context[0, 0] = math.nan
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=3, num_workers=0)
    with pytest.raises(ValueError, match=r"non-finite.*output.*abnormal_context"):
        engine(tmp_path).test(model, datamodule=datamodule)


# Prompts learned with other settings ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_prompt_file(tmp_path_factory, small_clip, released_prompts) -> Path:
    model = anomaly_clip(small_clip, prompt_weights=released_prompts["AnomalyCLIP"])
    return model.save_prompt_weights(tmp_path_factory.mktemp("own") / "prompts.pt")


@pytest.fixture(scope="module")
def other_clip_weights(tmp_path_factory, small_clip) -> Path:
    """The small CLIP's weights with one value changed: another pretrained weights file of the same size."""
    state_dict = torch.load(small_clip["pretrained"], weights_only=True)
    state_dict["visual.proj"][0, 0] += 0.5
    path = tmp_path_factory.mktemp("weights") / "clip_small_finetuned.pt"
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"image_size": 112}, r"image_size is 224 there and 112 here"),
        ({"feature_layers": (8,)}, r"feature_layers is \[2, 4, 6, 8\] there and \[8\] here"),
        ({"dpam_layers": 4}, r"dpam_layers is 6 there and 4 here"),
    ],
)
def test_prompt_file_of_other_settings_is_refused(own_prompt_file, small_clip, changed, message):
    with pytest.raises(SettingsMismatchError, match=rf"prompts\.pt.*{message}.*allow_setting_mismatch=True"):
        anomaly_clip(small_clip, prompt_weights=own_prompt_file, **changed)


def test_prompt_file_of_other_clip_weights_is_refused(own_prompt_file, other_clip_weights, small_clip):
    with pytest.raises(SettingsMismatchError, match=r"clip_weights.*clip_small_seed0\.pt.*clip_small_finetuned\.pt"):
        anomaly_clip(small_clip, pretrained=str(other_clip_weights), prompt_weights=own_prompt_file)


def test_moved_clip_weights_are_the_same_weights(own_prompt_file, small_clip, tmp_path):
    moved = tmp_path / "renamed.pt"
    shutil.copy(small_clip["pretrained"], moved)
    model = anomaly_clip(small_clip, pretrained=str(moved), prompt_weights=own_prompt_file)
    assert bool(model.model.prompts_ready)


def test_setting_mismatch_override_loads_the_prompts(own_prompt_file, other_clip_weights, small_clip, released_prompts):
    reference = anomaly_clip(small_clip, prompt_weights=released_prompts["AnomalyCLIP"]).model.prompt_state_dict()
    model = anomaly_clip(
        small_clip,
        image_size=112,
        pretrained=str(other_clip_weights),
        prompt_weights=own_prompt_file,
        allow_setting_mismatch=True,
    )
    assert bool(model.model.prompts_ready)
    loaded = model.model.prompt_state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in reference.items())


def test_lightning_checkpoint_of_other_settings_is_refused(yaml_fit, small_clip):
    _, checkpoint, _ = yaml_fit
    with pytest.raises(SettingsMismatchError, match=r"feature_layers is \[2, 4, 6, 8\] there and \[8\] here"):
        anomaly_clip(small_clip, feature_layers=(8,), prompt_weights=checkpoint)
    with pytest.raises(SettingsMismatchError, match=r"feature_layers is \[2, 4, 6, 8\] there and \[8\] here"):
        AnomalyCLIP.load_from_checkpoint(checkpoint, feature_layers=[8])
    model = anomaly_clip(small_clip, feature_layers=(8,), prompt_weights=checkpoint, allow_setting_mismatch=True)
    assert bool(model.model.prompts_ready)


# Checkpoints of models built from YAML reload ---------------------------------------------------------------------


def test_hyper_parameters_are_plain_python(small_clip):
    model = AnomalyCLIP(**small_clip, feature_layers=ListConfig([2, 4, 6, 8]), betas=ListConfig([0.5, 0.999]))
    assert model.hparams["feature_layers"] == [2, 4, 6, 8]
    assert type(model.hparams["feature_layers"]) is list
    assert type(model.hparams["betas"]) is list


def test_checkpoint_of_a_yaml_built_model_reloads(yaml_fit, small_clip, anomalyclip_golden):
    model, checkpoint, _ = yaml_fit
    # Loads with torch's weights-only unpickler, without anomalib's allow-list of classes.
    hyper_parameters = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hyper_parameters["feature_layers"] == [2, 4, 6, 8]
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        expected = model.model.eval()(images).pred_score
        reloaded = AnomalyCLIP.load_from_checkpoint(checkpoint)
        torch.testing.assert_close(reloaded.model.eval()(images).pred_score, expected, atol=0, rtol=0)
        as_prompts = anomaly_clip(small_clip, prompt_weights=checkpoint)
        torch.testing.assert_close(as_prompts.model.eval()(images).pred_score, expected, atol=0, rtol=0)


def test_truncated_prompt_file_is_refused_naming_it(own_prompt_file, small_clip, tmp_path):
    truncated = tmp_path / "prompts.pt"
    data = own_prompt_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Prompt weights file '.*prompts\.pt' is truncated or damaged"):
        anomaly_clip(small_clip, prompt_weights=truncated)
