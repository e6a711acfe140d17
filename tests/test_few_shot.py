"""Few-shot references: k normal images in a visual memory fused with the prompts (AnomalyCLIP, FAPrompt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Trainer

from anomalib_faprompt import AnomalyCLIP, FAPrompt

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}


def make_model(method, small_clip, released_prompts, **kwargs):
    extra = {"feature_layers": (4, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, prompt_weights=released_prompts[method], **kwargs)


def brute_force_visual(queries: list[torch.Tensor], references: list[torch.Tensor]) -> torch.Tensor:
    """Per layer and patch, min over every reference patch of (1 - cos) / 2, in float64: (layers, B, N)."""
    out = []
    for query, reference in zip(queries, references, strict=True):
        query = torch.nn.functional.normalize(query.double(), dim=-1)
        bank = torch.nn.functional.normalize(reference.double().reshape(-1, reference.shape[-1]), dim=-1)
        out.append(((1 - query @ bank.T) / 2).amin(dim=-1))
    return torch.stack(out)


@pytest.mark.parametrize("method", list(METHODS))
def test_k_shot_zero_scores_with_the_prompts_alone(method, small_clip, released_prompts):
    model = make_model(method, small_clip, released_prompts).model.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(images)
        features = model.forward_features(images)
    assert model.references.is_empty
    assert torch.equal(output.pred_score, features.pred_score)
    assert torch.equal(output.anomaly_map, model.smoothing(features.anomaly_map))


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_outputs_equal_an_independent_computation(method, small_clip, released_prompts):
    model = make_model(method, small_clip, released_prompts, reference_weight=0.3).model.eval()
    generator = torch.Generator().manual_seed(1)
    references, images = (
        torch.randn(3, 3, 224, 224, generator=generator),
        torch.randn(2, 3, 224, 224, generator=generator),
    )
    model.add_references(references)
    with torch.no_grad():
        output = model(images)
        features = model.forward_features(images)
        _, reference_features = model.encode_image(references, model.feature_layers)
    visual = brute_force_visual(features.patch_features, reference_features)  # (layers, B, N)
    side = round(visual.shape[-1] ** 0.5)
    grids = torch.nn.functional.interpolate(
        visual.float().reshape(-1, 1, side, side), size=(224, 224), mode="bilinear", align_corners=False
    ).reshape(visual.shape[0], 2, 224, 224)
    expected_map = model.smoothing(0.7 * features.anomaly_map + 0.3 * grids.sum(dim=0))
    expected_score = 0.7 * features.pred_score + 0.3 * grids.mean(dim=0).flatten(1).amax(dim=1)
    torch.testing.assert_close(output.anomaly_map, expected_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.pred_score, expected_score, atol=1e-5, rtol=0)


def test_an_image_identical_to_a_reference_has_no_visual_anomaly_where_it_matches(small_clip, released_prompts):
    model = make_model("FAPrompt", small_clip, released_prompts).model.eval()
    references = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    model.add_references(references)
    with torch.no_grad():
        features = model.forward_features(references[1:])
        visual = model.visual_anomaly_maps(features.patch_features, (224, 224))
    assert visual.abs().max() < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_engine_test_samples_k_normal_references_with_the_seed(method, small_clip, released_prompts, tiny_mvtec):
    model = make_model(method, small_clip, released_prompts, k_shot=2, reference_seed=3)
    assert model.learning_type == LearningType.FEW_SHOT
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", num_workers=0, train_batch_size=2, eval_batch_size=2)
    engine = Engine(accelerator="cpu", logger=False, default_root_dir=str(tiny_mvtec.parent / f"few_shot_{method}"))
    (metrics,) = engine.test(model=model, datamodule=datamodule)
    assert np.isfinite(metrics["image_AUROC"])

    # The memory holds the patch features of the two normal train images the seed picks, pre-processed as tests.
    datamodule.setup()
    normal = [i for i, label in enumerate(datamodule.train_data.samples.label_index) if label == 0]
    picked = [normal[i] for i in torch.randperm(len(normal), generator=torch.Generator().manual_seed(3))[:2]]
    images = torch.stack([model.pre_processor.transform(datamodule.train_data[i].image) for i in picked])
    _, expected = model.model.encode_image(images, model.model.feature_layers)
    layers, entries, width = model.model.references.bank.shape
    assert (layers, entries) == (len(model.model.feature_layers), 2 * expected[0].shape[1])
    torch.testing.assert_close(model.model.references.bank, torch.stack(expected).reshape(layers, -1, width))
    assert model.model.references.nbytes == layers * entries * width * 4


def test_more_references_than_normal_images_is_refused_naming_both(small_clip, released_prompts, tiny_mvtec):
    model = make_model("FAPrompt", small_clip, released_prompts, k_shot=9)
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", num_workers=0, eval_batch_size=2)
    engine = Engine(accelerator="cpu", logger=False, default_root_dir=str(tiny_mvtec.parent / "few_shot_refused"))
    with pytest.raises(ValueError, match=r"k_shot=9 but the train split of MVTecAD/widget holds only 4 normal image"):
        engine.test(model=model, datamodule=datamodule)


def test_few_shot_source_folder_and_bad_settings(small_clip, released_prompts, tiny_mvtec, tmp_path):
    folder = tiny_mvtec / "widget" / "train" / "good"
    model = make_model("AnomalyCLIP", small_clip, released_prompts, k_shot=2, few_shot_source=folder)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    model.collect_references()  # what validate, test and predict run at their start
    assert model.model.references.bank.shape[1] == 2 * (224 // model.model.vision.patch_size) ** 2
    with pytest.raises(FileNotFoundError, match=r"few_shot_source '.*missing' does not exist"):
        make_model("FAPrompt", small_clip, released_prompts, k_shot=1, few_shot_source=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"k_shot must be an integer >= 0"):
        FAPrompt(k_shot=-1)
    with pytest.raises(ValueError, match=r"reference_weight must be a finite number in 0..1"):
        FAPrompt(**small_clip, reference_weight=1.5)


def test_a_checkpoint_keeps_the_memory(small_clip, released_prompts, tmp_path):
    model = make_model("FAPrompt", small_clip, released_prompts, k_shot=1)
    model.model.add_references(torch.randn(1, 3, 224, 224))
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = FAPrompt.load_from_checkpoint(tmp_path / "model.ckpt")
    assert torch.equal(restored.model.references.bank, model.model.references.bank)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(restored.model.eval()(images).pred_score, model.model.eval()(images).pred_score)


def test_a_checkpoint_memory_asked_for_k_shot_zero_is_not_used(small_clip, released_prompts, tiny_mvtec, tmp_path,
                                                                caplog):  # fmt: skip
    """k_shot=0 is zero-shot: a memory that came with the checkpoint must not fuse into the scores."""
    model = make_model("FAPrompt", small_clip, released_prompts, k_shot=1)
    model.model.add_references(torch.randn(1, 3, 224, 224))
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = FAPrompt.load_from_checkpoint(tmp_path / "model.ckpt", k_shot=0)
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", num_workers=0)
    engine = Engine(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        (with_k0,) = engine.test(restored, datamodule=datamodule)
    assert restored.model.references.is_empty
    assert "k_shot=0, so the visual memory of 1 reference image(s) that came with the checkpoint" in caplog.text
    (zero_shot,) = engine.test(make_model("FAPrompt", small_clip, released_prompts), datamodule=datamodule)
    assert with_k0 == pytest.approx(zero_shot, abs=1e-7)


@pytest.mark.slow
def test_onnx_and_openvino_exports_with_the_memory_match_torch(small_clip, released_prompts, tmp_path):
    """The memory is a constant of the graphs; OpenVINO compiled in f32 (bf16 by default on AVX512-BF16/AMX CPUs)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import openvino

    model = make_model("AnomalyCLIP", small_clip, released_prompts, k_shot=2)
    model.model.add_references(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)))
    path = model.to_onnx(tmp_path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    exported = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    inferred = {output.get_any_name(): result[output] for output in compiled.outputs}
    with torch.no_grad():
        expected = model.eval()(images)
    for outputs in (exported, inferred):
        np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4)
        np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
