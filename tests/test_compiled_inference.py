"""``inference_compile``: the frozen vision encoder under ``torch.compile`` at inference, eager elsewhere.

On the CPU of CI this compiles inductor's C++ kernels (CUDA graphs apply on GPUs only, where
``benchmarks/benchmark.py --inference-compile reduce-overhead`` measures them); the outputs must equal the
eager model's within 1e-5 in fp32, through the torch model and through anomalib's engine.
"""

from __future__ import annotations

import logging

import pytest
import torch
from anomalib.data import PredictDataset
from anomalib.engine import Engine

from anomalib_faprompt.methods import METHODS


def build(method: str, settings: dict, **kwargs):
    return METHODS[method].load()(**settings, allow_untrained_prompts=True, **kwargs)


@pytest.mark.parametrize("mode", ["fast", "reduce_overhead", "none "])
def test_an_unknown_compile_mode_is_refused_at_construction_naming_the_setting(mode, small_clip):
    with pytest.raises(ValueError, match=r"inference_compile must be None \(eager\) or a torch.compile mode"):
        build("FAPrompt", small_clip, inference_compile=mode)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_inference_equals_eager_and_training_stays_eager(method, method_settings, caplog):
    settings = method_settings[method]
    torch.manual_seed(0)
    eager = build(method, settings).model.eval()
    compiled = build(method, settings, inference_compile="default").model.eval()
    compiled.load_state_dict(eager.state_dict())
    if method == "PromptAD":  # it scores against a visual memory of normal images
        references = torch.randn(2, 3, settings["image_size"], settings["image_size"])
        eager.add_references(references)
        compiled.add_references(references)
    images = torch.randn(3, 3, settings["image_size"], settings["image_size"])
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="anomalib_faprompt.clip.compiled"):
        expected = eager(images)
        first = compiled(images)
        second = compiled(images)
    for output in (first, second):
        torch.testing.assert_close(output.pred_score, expected.pred_score, rtol=0, atol=1e-5)
        torch.testing.assert_close(output.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-5)
    warmups = compiled.compiled_vision.warmup_seconds
    # The references (PromptAD: 2 images) and the batch of 3 compiled once each; the repeat reused its graph.
    assert len(warmups) == (2 if method == "PromptAD" else 1)
    assert all(seconds > 0 for seconds in warmups.values())
    assert "torch.compile (mode default) warm-up for images (3, 3" in caplog.text
    compiled.train()
    compiled.forward_features(images[:1])  # training runs the eager encoder: no new graph
    assert len(compiled.compiled_vision.warmup_seconds) == len(warmups)


@pytest.mark.slow
def test_engine_predict_with_compiled_inference_equals_eager(small_clip, released_prompts, tiny_mvtec, tmp_path):
    folder = tiny_mvtec / "widget" / "test" / "spot"
    predictions = {}
    for mode in (None, "default"):
        model = build("FAPrompt", small_clip, prompt_weights=released_prompts["FAPrompt"], inference_compile=mode)
        engine = Engine(default_root_dir=tmp_path / str(mode), accelerator="cpu", logger=False)
        predictions[mode] = engine.predict(model, dataset=PredictDataset(folder), return_predictions=True)
        if mode is not None:
            assert model.model.compiled_vision.warmup_seconds  # the engine's path ran the compiled encoder
    assert len(predictions[None]) == len(predictions["default"]) > 0
    for eager, compiled in zip(predictions[None], predictions["default"], strict=True):
        torch.testing.assert_close(compiled.pred_score, eager.pred_score, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled.anomaly_map, eager.anomaly_map, rtol=0, atol=1e-5)


def test_a_copied_or_pickled_model_compiles_around_its_own_encoder(small_clip):
    import copy
    import pickle

    model = build("FAPrompt", small_clip, inference_compile="default").model
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert duplicate.compiled_vision.mode == "default"
        assert duplicate.compiled_vision.encoder is duplicate.vision is not model.vision
        assert duplicate.compiled_vision.warmup_seconds == {}


def test_prompt_files_record_what_was_learned_not_how_a_run_executes(small_clip, released_prompts, tmp_path):
    from anomalib_faprompt.methods import RUN_TIME_SETTINGS

    compiled = build("FAPrompt", small_clip, prompt_weights=released_prompts["FAPrompt"], inference_compile="default")
    path = compiled.save_prompt_weights(tmp_path / "prompts.pt")
    recorded = torch.load(path, weights_only=False)["settings"]
    assert "inference_compile" in RUN_TIME_SETTINGS
    assert not RUN_TIME_SETTINGS & set(recorded)
    assert recorded["image_size"] == small_clip["image_size"]  # the learned settings are there
    eager = build("FAPrompt", small_clip, prompt_weights=path)  # loads without a settings mismatch
    assert eager.model.compiled_vision is None
    for name, value in compiled.model.prompt_state_dict().items():
        torch.testing.assert_close(eager.model.prompt_state_dict()[name], value, rtol=0, atol=0)
