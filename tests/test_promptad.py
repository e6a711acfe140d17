"""PromptAD as an anomalib model: fitting on k normal images, round-trips, export, deviations and errors.

The parity with the release is in ``test_parity_promptad.py``; here every figure is checked against an
independent computation (a hand-written training loop, scikit-learn, a brute-force nearest neighbour, the
fixture's recorded outputs, a model scoring one image at a time).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch, MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import Trainer
from sklearn.metrics import roc_auc_score

from anomalib_faprompt import PromptAD
from anomalib_faprompt.models.promptad.loss import PromptADLoss
from anomalib_faprompt.prompt_weights import SettingsMismatchError
from conftest import GOLDEN

K_SHOT, EPOCHS, SEED = 2, 3, 7


def datamodule(root) -> MVTecAD:
    return MVTecAD(root=root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def fitted(small_promptad, tiny_mvtec, tmp_path_factory):
    """PromptAD fitted by anomalib's engine on 2 of the tiny category's 4 normal images, with its initial prompts."""
    settings = {**small_promptad, "category": None}  # taken from the datamodule
    torch.manual_seed(0)
    model = PromptAD(**settings, k_shot=K_SHOT, reference_seed=SEED, max_epochs=EPOCHS)
    initial = {name: value.clone() for name, value in model.model.prompt_state_dict().items()}
    root = tmp_path_factory.mktemp("promptad_fit")
    engine = Engine(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False)
    data = datamodule(tiny_mvtec)
    engine.fit(model, datamodule=data)
    checkpoint = root / "fitted.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return {"model": model.eval(), "initial": initial, "engine": engine, "data": data, "checkpoint": checkpoint}


def sampled_shots(data: MVTecAD, model: PromptAD) -> torch.Tensor:
    """The k normal train images the seed picks, pre-processed (written out here, independently of the model)."""
    samples = data.train_data.samples
    normal = np.flatnonzero(samples["label_index"].to_numpy() == 0)
    order = torch.randperm(len(normal), generator=torch.Generator().manual_seed(SEED))[:K_SHOT]
    images = [data.train_data[int(normal[index])].image for index in order]
    return torch.stack([model.pre_processor.transform(image) for image in images])


def test_fit_equals_a_hand_written_training_loop_on_the_sampled_shots(fitted, small_promptad):
    model = fitted["model"]
    assert model.hparams["category"] == "widget" and model.model.category == "widget"
    assert bool(model.model.prompts_ready)
    shots = sampled_shots(fitted["data"], model)

    reference = PromptAD(**small_promptad | {"category": "widget"}, k_shot=K_SHOT).model
    reference.load_prompt_state_dict(fitted["initial"], trained=False)
    with torch.no_grad():
        features = reference.encode_features(shots)
    loss = PromptADLoss()
    parameters = list(reference.learnable_parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.002, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS, eta_min=1e-5)
    reference.train()
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        text = reference.encode_static_text()
        total = loss(features.image, text["image"], reference.logit_scale)["loss"]
        total = total + loss(features.patches, text["pixel"], reference.logit_scale)["loss"]
        total.backward()
        optimizer.step()
        schedule.step()

    learned = model.model.prompt_state_dict()
    for name, value in reference.prompt_state_dict().items():
        if name.startswith("heads."):
            torch.testing.assert_close(learned[name], value, atol=1e-6, rtol=0, msg=name)
            assert not torch.equal(learned[name], fitted["initial"][name]), f"{name} did not learn"
    # The visual memory holds the shots' memory-layer patches, normalised.
    expected_bank = F.normalize(features.memory.flatten(1, 2), dim=-1)
    torch.testing.assert_close(model.model.references.bank, expected_bank, atol=1e-6, rtol=0)


def test_memory_distances_equal_brute_force_and_a_reference_has_none(fitted, small_promptad):
    model = fitted["model"].model
    shots = sampled_shots(fitted["data"], fitted["model"])
    queries = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.encode_features(torch.cat([queries, shots[:1]]))
        visual = model.visual_map(features)
    bank = model.references.bank.double()
    memory = features.memory.double()
    brute = torch.stack([((1 - memory[layer] @ bank[layer].T) / 2).amin(dim=-1) for layer in range(2)]).mean(dim=0)
    torch.testing.assert_close(visual.double(), brute, atol=1e-6, rtol=0)
    assert visual[-1].abs().max() < 1e-6  # the image identical to a reference


def test_test_metrics_equal_scikit_learn_on_the_raw_outputs(fitted):
    model, engine, data = fitted["model"], fitted["engine"], fitted["data"]
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    scores, labels = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            scores.append(model.model(model.pre_processor.transform(batch.image)).pred_score)
            labels.append(batch.gt_label)
    expected = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    assert metrics["image_AUROC"] == pytest.approx(expected, abs=1e-6)


def test_checkpoint_and_prompt_file_round_trips_are_exact(fitted, tmp_path):
    model = fitted["model"]
    images = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.model(images)
    reloaded = PromptAD.load_from_checkpoint(fitted["checkpoint"]).eval()
    assert reloaded.model.category == "widget"
    path = model.save_prompt_weights(tmp_path / "prompts.pt")
    from_file = PromptAD(
        backbone=model.hparams["backbone"], pretrained=model.hparams["pretrained"], prompt_weights=path, k_shot=K_SHOT
    ).eval()
    assert from_file.model.category == "widget"  # from the file's record
    assert from_file.learning_type.value == "few_shot"
    for other in (reloaded, from_file):
        torch.testing.assert_close(other.model.references.bank, model.model.references.bank, atol=0, rtol=0)
        with torch.no_grad():
            output = other.model(images)
        torch.testing.assert_close(output.pred_score, expected.pred_score, atol=0, rtol=0)
        torch.testing.assert_close(output.anomaly_map, expected.anomaly_map, atol=0, rtol=0)


def test_prompts_of_another_category_are_refused_naming_it(fitted, tmp_path):
    path = fitted["model"].save_prompt_weights(tmp_path / "prompts.pt")
    hparams = fitted["model"].hparams
    with pytest.raises(SettingsMismatchError, match="category is widget there and bottle here"):
        PromptAD(backbone=hparams["backbone"], pretrained=hparams["pretrained"], category="bottle", prompt_weights=path)


def test_batch_invariance(fitted):
    model = fitted["model"].model
    images = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched = model(images)
        single = [model(image[None]) for image in images]
    torch.testing.assert_close(batched.pred_score, torch.cat([s.pred_score for s in single]), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in single]), atol=1e-6, rtol=0)


def test_bgr_test_images_score_as_the_release_feeds_them(fitted, small_promptad):
    """bgr_test_images=True scores an RGB image as the plain model scores the same file read as BGR."""
    model = fitted["model"]
    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    transform = model.pre_processor.transform
    bgr = PromptAD(**small_promptad | {"category": "widget"}, k_shot=K_SHOT, bgr_test_images=True).model.eval()
    bgr.load_prompt_state_dict(model.model.prompt_state_dict())
    with torch.no_grad():
        release = bgr(transform(raw))
        plain = model.model(transform(raw.flip(1)))
        rgb = model.model(transform(raw))
    torch.testing.assert_close(release.pred_score, plain.pred_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(release.anomaly_map, plain.anomaly_map, atol=1e-5, rtol=0)
    assert not torch.allclose(release.anomaly_map, rgb.anomaly_map, atol=1e-5)


def test_onnx_and_openvino_exports_match_torch(fitted, tmp_path):
    """f32 exports with the prototypes and the memory as constants, against the module's forward on raw images.

    OpenVINO is compiled in f32: its CPU plugin infers in bf16 by default on CPUs with AVX512-BF16 or AMX.
    """
    import onnxruntime
    import openvino

    model = fitted["model"]
    raw = torch.rand(3, 3, 96, 80, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(raw)
    onnx_path = model.to_onnx(tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: raw.numpy()}), strict=True))
    compiled = openvino.Core().compile_model(
        str(model.to_openvino(tmp_path / "openvino")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    result = compiled(raw.numpy())
    openvino_outputs = {output.get_any_name(): result[output] for output in compiled.outputs}
    for outputs in (onnx_outputs, openvino_outputs):
        for name in ("pred_score", "anomaly_map"):
            actual, reference = outputs[name].reshape(-1), getattr(expected, name).numpy().reshape(-1)
            np.testing.assert_allclose(actual, reference, atol=1e-4, rtol=0, err_msg=name)


def test_mixed_precision_stays_within_its_bound(fitted):
    """Autocast to bf16/fp16 (vision encoder in 16 bits; text, similarities and memory in fp32): outputs stay fp32.

    Measured on these images: bf16 moves the score by 6.5e-5 and the map by 2.5e-4, fp16 by 1.3e-5 and 3.4e-5.
    PromptAD has no order-sensitive step (unlike FAPrompt's top-M patches), so one bound holds on any CPU.
    """
    model = fitted["model"].model
    images = torch.randn(4, 3, 240, 240, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(images)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                mixed = model(images)
            assert mixed.pred_score.dtype == mixed.anomaly_map.dtype == torch.float32
            torch.testing.assert_close(mixed.pred_score, reference.pred_score, atol=1e-2, rtol=0)
            torch.testing.assert_close(mixed.anomaly_map, reference.anomaly_map, atol=1e-2, rtol=0)


def test_released_inference_checkpoints_score_as_the_release(promptad_golden, tmp_path):
    """The release's CLS/SEG inference checkpoints (prototypes + galleries) built from the fixture's values."""
    settings = promptad_golden["settings"]
    files = []
    for run in ("cls", "seg"):
        content = {
            "text_features": promptad_golden[run]["expected"]["text"]["text_prototypes"],
            "feature_gallery1": promptad_golden["visual"]["feature_gallery1"],
            "feature_gallery2": promptad_golden["visual"]["feature_gallery2"],
        }
        files.append(tmp_path / f"{run.upper()}-{settings['class_name']}.pt")
        torch.save(content, files[-1])
    backbone = tmp_path / "clip.json"
    backbone.write_text(json.dumps(promptad_golden["open_clip_config"]))
    model_settings = {
        "backbone": str(backbone),
        "pretrained": str(GOLDEN / promptad_golden["clip_weights"]),
        "image_size": settings["image_size"],
        "map_size": settings["out_size"],
        "sigma": float(settings["sigma"]),
        "memory_layers": [block + 2 for block in settings["memory_hook_blocks"]],
        "k_shot": settings["k_shot"],
    }
    model = PromptAD.from_released(*files, **model_settings).eval()
    with torch.no_grad():
        output = model.model(promptad_golden["inputs"]["test_images"])
    torch.testing.assert_close(
        output.pred_score, promptad_golden["cls"]["expected"]["scores"]["image_score"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        output.anomaly_map, promptad_golden["seg"]["expected"]["scores"]["seg_map_final"], atol=1e-4, rtol=0
    )
    # Saved in this package's format and reloaded: the same scores.
    path = model.save_prompt_weights(tmp_path / "prompts.pt")
    again = PromptAD(**model_settings, prompt_weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model(promptad_golden["inputs"]["test_images"]).pred_score, output.pred_score)


# Errors ------------------------------------------------------------------------------------------------------------


def test_k_shot_zero_is_refused_at_construction(small_promptad):
    with pytest.raises(ValueError, match=r"k_shot must be at least 1, got 0.*AnomalyCLIP or FAPrompt"):
        PromptAD(**small_promptad, k_shot=0)


def test_more_shots_than_normal_images_is_refused_naming_the_count(small_promptad, tiny_mvtec, tmp_path):
    model = PromptAD(**small_promptad, k_shot=5, max_epochs=1)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"k_shot=5 but the train split of MVTecAD/widget holds only 4 normal"):
        engine.fit(model, datamodule=datamodule(tiny_mvtec))
    assert not bool(model.model.prompts_ready)


def test_released_prompts_of_another_backbone_width_are_refused(small_promptad, promptad_golden):
    model = PromptAD(**small_promptad)
    released = {
        run: {
            key: (torch.zeros(*value.shape[:-1], 640) if key.endswith("_ctx") else value)
            for key, value in promptad_golden[run]["prompt_checkpoint"]["prompt_learner"].items()
        }
        for run in ("cls", "seg")
    }
    with pytest.raises(ValueError, match=r"normal_ctx.*text width of the backbone is 640 there and 128 here"):
        model.model.load_released(released["cls"], released["seg"], source="'CLS.pt', 'SEG.pt'")


def test_released_prompts_of_another_category_are_refused(small_promptad, promptad_golden):
    model = PromptAD(**small_promptad | {"category": "bottle"})
    learners = [promptad_golden[run]["prompt_checkpoint"]["prompt_learner"] for run in ("cls", "seg")]
    with pytest.raises(ValueError, match=r"built for another object name.*category 'bottle'"):
        model.model.load_released(*learners, source="(fixture)")


def test_a_category_without_manual_states_uses_the_generic_ones_and_says_so(small_promptad, caplog):
    with caplog.at_level(logging.INFO, logger="anomalib_faprompt"):
        model = PromptAD(**small_promptad | {"category": "disc"})
    assert "no manual anomaly states for category 'disc'; using the 8 generic states" in caplog.text
    head = model.model.heads["image"]
    assert head.texts["manual"][:: head.normal_context.shape[0]] == [
        f"N N N N {state.format('disc')}." for state in
        ["damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}", "{} with flaw", "{} with defect",
         "{} with damage"]
    ]  # fmt: skip


def test_a_datamodule_without_category_asks_for_one(small_promptad, tiny_mvtec, tmp_path):
    from anomalib.data import Folder

    data = Folder(
        name="widgets", root=tiny_mvtec / "widget", normal_dir="train/good", abnormal_dir="test/spot",
        num_workers=0, train_batch_size=2, eval_batch_size=2,
    )  # fmt: skip
    model = PromptAD(**small_promptad | {"category": None}, max_epochs=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=1)
    with pytest.raises(ValueError, match=r"needs the category's name.*--model.category"):
        trainer.fit(model, datamodule=data)


def test_predict_on_a_folder_from_a_checkpoint_uses_its_memory(fitted, tiny_mvtec, tmp_path):
    """No train split to sample from: the checkpoint's memory scores (restored before prediction starts)."""
    folder = tiny_mvtec / "widget" / "test" / "spot"
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    model = PromptAD.load_from_checkpoint(fitted["checkpoint"])
    fresh = PromptAD(**{key: model.hparams[key] for key in ("backbone", "pretrained", "category")}, k_shot=K_SHOT)
    predictions = engine.predict(fresh, ckpt_path=fitted["checkpoint"], data_path=folder)
    scores = torch.cat([batch.pred_score for batch in predictions])
    paths = [path for batch in predictions for path in batch.image_path]
    raw = torch.stack([read_image(path, as_tensor=True) for path in paths])
    model = fitted["model"]
    with torch.no_grad():
        output = model.model(model.pre_processor.transform(raw))
        expected = model.post_processor(InferenceBatch(pred_score=output.pred_score, anomaly_map=output.anomaly_map))
    torch.testing.assert_close(scores, expected.pred_score, atol=1e-5, rtol=0)


def test_a_checkpoint_asked_for_another_k_rebuilds_its_memory_or_refuses_naming_both(fitted, tiny_mvtec, tmp_path):
    """Learned with k = 2, asked for k = 1: with a train split the memory is rebuilt from one image; predicting on
    a folder (no train split) would score against the stored 2-image memory, so it is refused."""
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    folder = tiny_mvtec / "widget" / "test" / "spot"
    model = PromptAD.load_from_checkpoint(fitted["checkpoint"], k_shot=1)
    assert model.model.reference_count == K_SHOT
    with pytest.raises(ValueError, match=rf"k_shot=1 was asked, but the visual memory .* holds {K_SHOT} reference "
                                         rf"image\(s\).*Use k_shot={K_SHOT}"):  # fmt: skip
        engine.predict(model, data_path=folder)

    engine.test(model, datamodule=datamodule(tiny_mvtec))
    assert model.model.reference_count == 1 and len(model.reference_files) == 1
    shot = model.pre_processor.transform(read_image(model.reference_files[0], as_tensor=True))[None]
    torch.testing.assert_close(model.model.references.bank, model.model.encode_features(shot).memory.flatten(1, 2))


def test_default_thresholds_before_calibration_cover_the_half_harmonic_range(small_promptad):
    """Scores and maps lie in [0, 1/2]: uncalibrated, they are normalised over that range, labelled above 1/4."""
    post_processor = PromptAD(**small_promptad).post_processor
    assert post_processor.image_threshold.item() == post_processor.pixel_threshold.item() == 0.25
    assert post_processor.image_max.item() == post_processor.pixel_max.item() == 0.5
    scores = torch.tensor([0.1, 0.3])
    normalised = post_processor(InferenceBatch(pred_score=scores, anomaly_map=torch.zeros(2, 4, 4)))
    assert normalised.pred_label.tolist() == [False, True]


def test_cli_train_then_test_and_predict_with_only_model_and_ckpt_path(small_promptad, tiny_mvtec, tmp_path):
    """``anomalib train --model PromptAD ... --model.k_shot 2``, then the checkpoint alone rebuilds the model."""
    from anomalib.cli.cli import AnomalibCLI

    data = ["--data", "MVTecAD", "--data.root", str(tiny_mvtec), "--data.category", "widget"]
    data += ["--data.num_workers", "0", "--data.eval_batch_size", "4"]
    model = ["--model", "PromptAD", "--model.backbone", small_promptad["backbone"]]
    model += ["--model.pretrained", small_promptad["pretrained"], "--model.k_shot", "2", "--model.max_epochs", "2"]
    common = ["--default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    trained = AnomalibCLI(["train", *model, *data, *common])
    checkpoint = next(tmp_path.rglob("model.ckpt"))
    assert (checkpoint.parent / "prompts.pt").is_file()
    expected = {name: float(value) for name, value in trained.engine.trainer.callback_metrics.items()}
    assert trained.model.hparams["category"] == "widget"

    tested = AnomalibCLI(["test", "--model", "PromptAD", "--ckpt_path", str(checkpoint), *data, *common])
    assert tested.model.hparams["k_shot"] == 2 and tested.model.hparams["category"] == "widget"
    metrics = {name: float(value) for name, value in tested.engine.trainer.callback_metrics.items()}
    for name in ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name

    folder = tiny_mvtec / "widget" / "test" / "spot"
    output = tmp_path / "predicted"
    AnomalibCLI(["predict", "--model", "PromptAD", "--ckpt_path", str(checkpoint), "--data", str(folder),
                 "--default_root_dir", str(output)])  # fmt: skip
    written = sorted(path.name for path in output.rglob("*.png") if "images" in path.parts)
    assert written == sorted(path.name for path in folder.glob("*.png"))


def test_the_random_small_clip_of_its_fixture_is_named_on_heat_maps_and_tables(small_promptad):
    from anomalib_faprompt.visualization import untrained_weights_notice

    assert untrained_weights_notice(PromptAD(**small_promptad)) == (
        "the random small CLIP of shared/golden (clip_small_promptad_seed1.pt)"
    )


def test_a_fit_validates_once_after_its_last_epoch(small_promptad, tiny_mvtec, tmp_path):
    """Validation only calibrates thresholds (no epoch is selected): once, not after each of the 100 epochs."""
    from lightning.pytorch import Callback

    class CountValidations(Callback):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.epochs.append(trainer.current_epoch)

    model = PromptAD(**small_promptad, k_shot=2, max_epochs=3)
    assert model.trainer_arguments["check_val_every_n_epoch"] == 3
    counter = CountValidations()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                    callbacks=[counter])  # fmt: skip
    engine.fit(model, datamodule=datamodule(tiny_mvtec))
    assert counter.epochs == [2]
