"""Bad input gets a clear, actionable error."""

from __future__ import annotations

import time

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.clip import WeightsNotFoundError
from anomalib_faprompt.models.readiness import UntrainedPromptsError


def anomaly_clip(small_clip, **kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(**{**small_clip, "feature_layers": (2, 4, 6, 8), **kwargs})


def test_missing_weights_file_names_the_alternatives(small_clip, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"does not exist.*'openai'.*pretrained=None"):
        anomaly_clip(small_clip, pretrained=str(tmp_path / "ViT-L-14-336px.pt"))


def test_offline_tag_says_which_file_to_get(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    expected = r"HF_HUB_OFFLINE is set.*openaipublic.*ViT-B-16\.pt.*pretrained=/path/to/that/file"
    with pytest.raises(WeightsNotFoundError, match=expected):
        AnomalyCLIP(backbone="ViT-B-16", pretrained="openai", image_size=224, feature_layers=(12,), dpam_layers=10)
    assert time.monotonic() - start < 5


def test_cli_reports_a_bad_setting_in_its_last_line(small_clip, capsys):
    """Not inside jsonargparse's "Does not validate against any of the Union subtypes" dump."""
    from anomalib.cli.cli import AnomalibCLI

    arguments = ["test", "--model", "FAPrompt", "--model.backbone", small_clip["backbone"]]
    arguments += ["--model.pretrained", "null"]
    with pytest.raises(SystemExit) as exit_info:
        AnomalibCLI([*arguments, "--model.image_size", "225", "--data", "MVTecAD"], run=False)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    last = [line for line in error.splitlines() if line.strip()][-1]
    assert "image_size" in last
    assert "multiple of the backbone's patch size 14" in last
    assert "Union subtypes" not in error


def test_unknown_backbone(tmp_path):
    with pytest.raises(ValueError, match="Unknown CLIP backbone 'ViT-Q-99'"):
        AnomalyCLIP(backbone="ViT-Q-99", pretrained=None)


def test_image_size_must_fit_the_patch_grid(small_clip):
    with pytest.raises(ValueError, match="multiple of the backbone's patch size 14"):
        anomaly_clip(small_clip, image_size=225)


def test_prompts_of_the_other_method_are_refused(small_clip, released_prompts):
    with pytest.raises(ValueError, match=r"FAPrompt prompt checkpoint.*FAPrompt\(prompt_weights"):
        anomaly_clip(small_clip, prompt_weights=released_prompts["FAPrompt"])
    with pytest.raises(ValueError, match="AnomalyCLIP prompt checkpoint"):
        FAPrompt(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"])


def test_prompts_of_another_configuration_name_the_setting(small_clip, released_prompts, tmp_path):
    with pytest.raises(ValueError, match="n_ctx: 12 in the checkpoint, 8 here"):
        anomaly_clip(small_clip, n_ctx=8, prompt_weights=released_prompts["AnomalyCLIP"])
    with pytest.raises(ValueError, match="text_depth is 9 there and 5 here"):
        anomaly_clip(small_clip, text_depth=5, prompt_weights=released_prompts["AnomalyCLIP"])
    with pytest.raises(ValueError, match="n_abnormal_prompts: 10 in the checkpoint, 4 here"):
        FAPrompt(**small_clip, n_abnormal_prompts=4, prompt_weights=released_prompts["FAPrompt"])
    own_file = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"]).save_prompt_weights(
        tmp_path / "p.pt"
    )
    with pytest.raises(ValueError, match="holds FAPrompt prompts; load it with FAPrompt"):
        anomaly_clip(small_clip, prompt_weights=own_file)


def test_missing_or_foreign_prompt_file(small_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="Prompt weights file"):
        anomaly_clip(small_clip, prompt_weights=tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="is not a prompt checkpoint"):
        anomaly_clip(small_clip, prompt_weights=foreign)


@pytest.fixture
def tiny_datamodule(tiny_mvtec):
    return MVTecAD(root=tiny_mvtec, category="widget", train_batch_size=2, eval_batch_size=2, num_workers=0)


def test_one_class_train_split_is_refused_with_the_protocol(small_clip, tiny_datamodule, tmp_path):
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(ValueError, match=r"no anomalous samples \(a one-class split\).*auxiliary labelled dataset"):
        engine.fit(anomaly_clip(small_clip), datamodule=tiny_datamodule)


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_untrained_prompts_are_refused(stage, small_clip, tiny_datamodule, tmp_path):
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(UntrainedPromptsError, match=f"cannot {stage}.*prompt_weights="):
        getattr(engine, stage)(FAPrompt(**small_clip), datamodule=tiny_datamodule)


def test_untrained_prompts_allowed_explicitly(small_clip, tiny_datamodule, tmp_path):
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu")
    results = engine.test(FAPrompt(**small_clip, allow_untrained_prompts=True), datamodule=tiny_datamodule)
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0
