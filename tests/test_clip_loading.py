"""CLIP weights files: state dicts load through open_clip's ``load_checkpoint`` in every format it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_faprompt.clip.loading import build_clip


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if value.is_floating_point()}


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = weights(model), weights(reference)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def reference(small_clip) -> torch.nn.Module:
    return build_clip(small_clip["backbone"], small_clip["pretrained"])


@pytest.fixture(scope="module")
def clip_state_dict(small_clip) -> dict[str, torch.Tensor]:
    return torch.load(small_clip["pretrained"], map_location="cpu", weights_only=True)


def test_reference_weights_are_the_file_s(reference, clip_state_dict):
    for key, value in clip_state_dict.items():
        expected = value.float()  # stored in fp16; the model runs in fp32
        torch.testing.assert_close(reference.state_dict()[key].reshape(value.shape), expected, rtol=0, atol=0)


def test_safetensors_file_loads(small_clip, reference, clip_state_dict, tmp_path):
    """open_clip tags cached from the Hugging Face hub are ``open_clip_model.safetensors`` files."""
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in clip_state_dict.items()}, str(path))
    assert_same_weights(build_clip(small_clip["backbone"], path), reference)


@pytest.mark.parametrize("wrapping", ["state_dict", "module_prefix"])
def test_training_checkpoints_load(small_clip, reference, clip_state_dict, tmp_path, wrapping):
    """open_clip's training checkpoints: ``{"state_dict": ...}``, with DistributedDataParallel's ``module.``."""
    state_dict = clip_state_dict
    if wrapping == "module_prefix":
        state_dict = {f"module.{key}": value for key, value in state_dict.items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": state_dict}, path)
    assert_same_weights(build_clip(small_clip["backbone"], path), reference)


def test_weights_of_another_architecture_are_refused_naming_the_file(small_clip, clip_state_dict, tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save({key: value for key, value in clip_state_dict.items() if not key.startswith("visual.")}, path)
    expected = r"truncated\.pt' do not fit the architecture: \d+ missing keys \(visual\."
    with pytest.raises(ValueError, match=expected):
        build_clip(small_clip["backbone"], path)


def test_a_file_without_a_state_dict_is_refused(small_clip, tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds a list, not a CLIP state dict"):
        build_clip(small_clip["backbone"], path)


def test_weights_of_another_image_size_are_refused_not_interpolated(small_clip, tmp_path):
    """open_clip's load_checkpoint would resize the positional embeddings silently; the architecture must match."""
    import json

    config = json.loads(Path(small_clip["backbone"]).read_text())
    vision = config.get("model_cfg", config)["vision_cfg"]
    vision["image_size"] *= 2
    backbone = tmp_path / "clip_small_double_size.json"
    backbone.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit the architecture.*visual\.positional_embedding"):
        build_clip(backbone, small_clip["pretrained"])
