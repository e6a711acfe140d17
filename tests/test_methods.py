"""The one list of methods (``anomalib_faprompt.methods``) and what reads it; learned buffers in prompt files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anomalib.models
import pytest
import torch
from lightning.pytorch import Trainer

import anomalib_faprompt
from anomalib_faprompt.cli import CheckpointSettingsError, settings_from_checkpoint
from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.components import VisualMemory
from anomalib_faprompt.methods import METHODS, Learning, get_method, recorded_method
from anomalib_faprompt.prompt_weights import (
    NonFiniteValuesError,
    load_prompt_weights,
    save_prompt_weights,
)

METHOD_NAMES = list(METHODS)
#: The methods whose authors released prompt checkpoints, and those whose old checkpoints recorded no method.
RELEASED = [name for name in METHOD_NAMES if METHODS[name].released_prompts is not None]
UNRECORDED = [name for name in METHOD_NAMES if METHODS[name].unrecorded_checkpoint is not None]


def build(name: str, method_settings, **kwargs):
    """The method on its small random CLIP (``method_settings``, conftest)."""
    return METHODS[name].load()(**method_settings[name], allow_untrained_prompts=True, **kwargs)


def lightning_checkpoint(module, path: Path) -> Path:
    """A Lightning checkpoint written by Lightning itself (the module's on_save_checkpoint included), without fit."""
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=path.parent)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def other(name: str) -> str:
    return next(other for other in METHOD_NAMES if other != name)


# The list ---------------------------------------------------------------------------------------------------------


def test_methods_module_imports_the_standard_library_only():
    """The start-up hook may read the list without importing torch or anomalib."""
    path = Path(anomalib_faprompt.__file__).parent / "methods.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('methods', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['methods'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(list(module.METHODS))\n"
        "heavy = sorted(name for name in ('torch', 'anomalib', 'lightning', 'open_clip') if name in sys.modules)\n"
        "print(heavy)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert output[0] == repr(METHOD_NAMES)
    assert output[1] == "[]"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_is_registered_and_resolvable(name):
    method = METHODS[name]
    model_class = method.load()
    assert model_class.__name__ == name
    assert getattr(anomalib.models, name) is model_class
    assert name in anomalib.models.__all__
    assert getattr(anomalib_faprompt, name) is model_class
    assert name in anomalib_faprompt.__all__
    assert model_class.method_name == method.prompt_identity
    assert get_method(method.prompt_identity) is method


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_get_model_builds_every_method(name, method_settings):
    model = anomalib.models.get_model(name, **method_settings[name], allow_untrained_prompts=True)
    assert type(model) is METHODS[name].load()
    by_class_path = anomalib.models.get_model(
        {"class_path": name, "init_args": {**method_settings[name], "allow_untrained_prompts": True}}
    )
    assert type(by_class_path) is METHODS[name].load()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_learning_type_is_one_the_entry_declares(name, method_settings, released_prompts):
    declared = {learning.anomalib_learning_type for learning in METHODS[name].load().learning_types}
    assert build(name, method_settings).learning_type in declared  # learns its prompts on auxiliary data
    if METHODS[name].released_prompts is not None:
        loaded = build(name, method_settings, prompt_weights=released_prompts[name])
        assert loaded.learning_type in declared
        assert Learning.ZERO_SHOT in METHODS[name].load().learning_types


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="AnomalyCLIP, FAPrompt") as error:
        get_method("PatchCore")
    assert "'PatchCore'" in str(error.value)


# Prompt files and checkpoints of one method loaded into another -------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_prompt_file_of_another_method_is_refused_naming_both(name, method_settings, tmp_path):
    source = build(name, method_settings)
    path = save_prompt_weights(source.model, tmp_path / "prompts.pt", source.method_name, {}, trained=False)
    target = build(other(name), method_settings)
    with pytest.raises(ValueError, match=f"holds {name} prompts.*with {name}, not {other(name)}"):
        load_prompt_weights(target.model, path, target.method_name)


@pytest.mark.parametrize("name", RELEASED)
def test_released_checkpoint_of_another_method_is_refused_naming_both(name, method_settings, released_prompts):
    target = build(other(name), method_settings)
    expected = re.escape(f"{name} prompt checkpoint (the authors' released format); load it with {name}(prompt_weights")
    with pytest.raises(ValueError, match=rf"{expected}=\.\.\.\), not {other(name)}") as error:
        load_prompt_weights(target.model, released_prompts[name], target.method_name)
    assert str(released_prompts[name]) in str(error.value)


def test_released_checkpoint_with_unknown_keys_is_refused(method_settings, released_prompts, tmp_path):
    content = torch.load(released_prompts["AnomalyCLIP"], weights_only=True)
    content["prompt_learner"]["visual_adapter.weight"] = torch.zeros(2, 2)
    path = tmp_path / "released.pth"
    torch.save(content, path)
    target = build("AnomalyCLIP", method_settings)
    with pytest.raises(ValueError, match=r"keys match no method's released format.*visual_adapter\.weight"):
        load_prompt_weights(target.model, path, "AnomalyCLIP")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_lightning_checkpoint_records_its_method_and_is_refused_by_another(name, method_settings, tmp_path):
    path = lightning_checkpoint(build(name, method_settings), tmp_path / "model.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["prompt_settings"]["method"] == METHODS[name].prompt_identity
    assert recorded_method(checkpoint) == name
    target = build(other(name), method_settings)
    with pytest.raises(ValueError, match=f"{name} checkpoint; load it with {name}, not {other(name)}"):
        load_prompt_weights(target.model, path, target.method_name)
    target_class = METHODS[other(name)].load()
    with pytest.raises(CheckpointSettingsError, match=f"holds a {name} checkpoint, not one of {other(name)}"):
        settings_from_checkpoint(target_class, {}, set(), checkpoint, path)


def test_checkpoint_recording_an_unknown_method_is_refused_naming_it(method_settings, tmp_path):
    path = lightning_checkpoint(build("AnomalyCLIP", method_settings), tmp_path / "model.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["prompt_settings"]["method"] = "NotAMethod"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="NotAMethod checkpoint; load it with NotAMethod, not AnomalyCLIP"):
        load_prompt_weights(build("AnomalyCLIP", method_settings).model, path, "AnomalyCLIP")


@pytest.mark.parametrize("name", UNRECORDED)
def test_unrecorded_checkpoint_is_recognised_by_its_declared_keys(name, method_settings, tmp_path):
    """Checkpoints written before checkpoints recorded their method: the entry's ``unrecorded_checkpoint`` keys."""
    torch.manual_seed(1)
    source = build(name, method_settings)
    path = lightning_checkpoint(source, tmp_path / "model.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["prompt_settings"]
    # As those versions wrote them: no visual memory either.
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.endswith(".bank")}
    torch.save(checkpoint, path)
    assert recorded_method(checkpoint) == name

    target = build(name, method_settings)
    load_prompt_weights(target.model, path, name)
    expected = {k: v for k, v in source.model.prompt_state_dict().items() if not k.endswith(".bank")}
    loaded = target.model.prompt_state_dict()
    assert expected.keys() <= loaded.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    with pytest.raises(ValueError, match=f"{name} checkpoint; load it with {name}, not {other(name)}"):
        load_prompt_weights(build(other(name), method_settings).model, path, other(name))


def test_unrecorded_checkpoint_matching_no_method_is_refused(method_settings, tmp_path):
    path = lightning_checkpoint(build("AnomalyCLIP", method_settings), tmp_path / "model.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["prompt_settings"]
    checkpoint["state_dict"]["model.adapter.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, path)
    assert recorded_method(checkpoint) is None
    with pytest.raises(ValueError, match="records no method and its learned keys match no method's"):
        load_prompt_weights(build("AnomalyCLIP", method_settings).model, path, "AnomalyCLIP")


# Learned buffers -------------------------------------------------------------------------------------------------


class PromptedWithMemory(PromptedCLIP):
    """The shared base with a memory of its own, as a few-shot method would hold one."""

    def __init__(self, small_clip: dict) -> None:
        super().__init__(**small_clip, text_depth=3, text_n_ctx=2)
        self.memory = VisualMemory(chunk_size=64)


def test_learned_buffers_are_part_of_the_prompt_state(small_clip):
    model = PromptedWithMemory(small_clip)
    names = model.learned_state_names()
    assert "memory.bank" in names
    assert "prompts_ready" not in names  # a flag, not learned state
    assert {name for name, p in model.named_parameters() if p.requires_grad} <= set(names)
    assert set(model.prompt_state_dict()) == set(names)


def test_memory_round_trips_through_a_prompt_file(small_clip, tmp_path):
    torch.manual_seed(0)
    model = PromptedWithMemory(small_clip)
    with torch.no_grad():
        for prompt in model.deep_prompts:
            prompt.add_(torch.randn_like(prompt))
    model.memory.add(torch.randn(2, 3, 49, 16))
    path = save_prompt_weights(model, tmp_path / "prompts.pt", "WithMemory", {"k_shot": 3})

    fresh = PromptedWithMemory(small_clip)
    assert fresh.memory.is_empty
    loaded = load_prompt_weights(fresh, path, "WithMemory")
    assert loaded.trained
    assert bool(fresh.prompts_ready)
    torch.testing.assert_close(fresh.memory.bank, model.memory.bank, rtol=0, atol=0)
    for theirs, ours in zip(fresh.deep_prompts, model.deep_prompts, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    queries = torch.randn(2, 1, 49, 16)
    torch.testing.assert_close(fresh.memory(queries), model.memory(queries), rtol=0, atol=0)


def test_memory_loads_from_a_lightning_checkpoint(small_clip, tmp_path):
    torch.manual_seed(0)
    model = PromptedWithMemory(small_clip)
    model.memory.add(torch.randn(1, 2, 49, 16))
    path = tmp_path / "model.ckpt"
    state_dict = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "prompt_settings": {"method": "WithMemory"}}, path)
    fresh = PromptedWithMemory(small_clip)
    load_prompt_weights(fresh, path, "WithMemory")
    torch.testing.assert_close(fresh.memory.bank, model.memory.bank, rtol=0, atol=0)


def test_non_finite_memory_is_refused_on_save_and_load(small_clip, tmp_path):
    model = PromptedWithMemory(small_clip)
    model.memory.add(torch.randn(1, 2, 49, 16))
    model.memory.bank[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteValuesError, match=r"memory\.bank holds 1 non-finite"):
        save_prompt_weights(model, tmp_path / "bad.pt", "WithMemory", {})
    assert not (tmp_path / "bad.pt").exists()

    model.memory.bank[0, 0, 0] = 0.0
    path = save_prompt_weights(model, tmp_path / "prompts.pt", "WithMemory", {})
    content = torch.load(path, weights_only=True)
    content["state_dict"]["memory.bank"][0, 1, 2] = float("inf")
    torch.save(content, path)
    with pytest.raises(NonFiniteValuesError, match=r"memory\.bank has 1 non-finite"):
        load_prompt_weights(PromptedWithMemory(small_clip), path, "WithMemory")


def test_version_2_prompt_file_without_buffers_still_loads(small_clip, tmp_path):
    """Files written before learned buffers were saved: parameters only; the memory stays as it is."""
    torch.manual_seed(0)
    model = PromptedWithMemory(small_clip)
    parameters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    path = tmp_path / "v2.pt"
    torch.save(
        {
            "format": "anomalib_faprompt.prompts",
            "version": 2,
            "method": "WithMemory",
            "trained": True,
            "prompt_settings": {},
            "settings": {},
            "state_dict": parameters,
        },
        path,
    )
    fresh = PromptedWithMemory(small_clip)
    load_prompt_weights(fresh, path, "WithMemory")
    assert fresh.memory.is_empty
    assert bool(fresh.prompts_ready)
    for name, value in fresh.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, parameters[name], rtol=0, atol=0)


def test_unexpected_buffer_in_a_prompt_file_is_refused(small_clip, tmp_path):
    model = PromptedWithMemory(small_clip)
    path = save_prompt_weights(model, tmp_path / "prompts.pt", "WithMemory", {})
    content = torch.load(path, weights_only=True)
    content["state_dict"]["other_memory.bank"] = torch.zeros(1, 2, 16)
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"unexpected \['other_memory\.bank'\]"):
        load_prompt_weights(PromptedWithMemory(small_clip), path, "WithMemory")
