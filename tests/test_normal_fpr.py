"""Thresholds from normal images only (``normal_fpr``): the quantile, its stated interval, every path that uses it.

- The threshold is an order statistic of the normal scores (numpy's sort of the model's own raw scores), chosen so
  that the mean rate ``(a + 1) / (N + 1)`` of flagged new normal images is the largest at or below the rate asked.
- The stated intervals hold: by simulation (rate and count of flagged new values), and on a held-apart set of
  normal images scored by the model (synthetic data, random small CLIP).
- The thresholds go through the checkpoint, ``anomalib predict``'s labels, and the ONNX/OpenVINO (f32) exports.
- Too few normal images and bad settings are refused, naming the numbers; the post-processor works for PatchCore
  (``Engine`` and ``anomalib train --model.post_processor``), and from a folder of normal images.
"""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import Folder, PredictDataset
from anomalib.engine import Engine
from PIL import Image

from anomalib_faprompt import AnomalyCLIP
from anomalib_faprompt.post_processing import NormalFPRPostProcessor, NormalQuantile
from anomalib_faprompt.post_processing import normal_quantile as normal_quantile_module

NORMAL_FPR = 0.05
#: Normal images written; 80 % go to the test split, which anomalib halves into validation and test.
NORMAL_IMAGES = 300
ANOMALOUS_IMAGES = 20


def write_folder_dataset(root: Path, size: int = 64, seed: int = 0) -> Path:
    """Textured normal images and anomalous ones (a bright square) with masks, in Folder's layout."""
    rng = np.random.default_rng(seed)
    for name in ("good", "bad", "masks"):
        (root / name).mkdir(parents=True, exist_ok=True)

    def texture() -> np.ndarray:
        base = rng.normal(110, 14, (size, size, 1)) + np.linspace(0, rng.uniform(10, 60), size)[None, :, None]
        return np.clip(np.repeat(base, 3, axis=2), 0, 255)

    for index in range(NORMAL_IMAGES):
        Image.fromarray(texture().astype("uint8")).save(root / "good" / f"{index:03d}.png")
    for index in range(ANOMALOUS_IMAGES):
        image, mask = texture(), np.zeros((size, size), dtype="uint8")
        top, left = rng.integers(4, size - 20, 2)
        image[top : top + 14, left : left + 14] = 250
        mask[top : top + 14, left : left + 14] = 255
        Image.fromarray(image.astype("uint8")).save(root / "bad" / f"{index:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index:03d}.png")
    return root


def folder_datamodule(root: Path) -> Folder:
    return Folder(
        name="textures", root=root, normal_dir="good", abnormal_dir="bad", mask_dir="masks", normal_split_ratio=0.8,
        val_split_mode="from_test", val_split_ratio=0.5, seed=0, num_workers=0, train_batch_size=16,
        eval_batch_size=16,
    )  # fmt: skip


def raw_outputs(model: Any, items: list) -> tuple[np.ndarray, np.ndarray]:
    """The torch model's own scores and maps of dataset items, pre-processed as the engine does."""
    images = torch.stack([model.pre_processor.transform(item.image) for item in items])
    with torch.no_grad():
        output = model.model.eval()(images)
    return output.pred_score.reshape(len(items)).numpy(), output.anomaly_map.reshape(len(items), -1).numpy()


def order_statistic(values: np.ndarray, fpr: float) -> tuple[float, int]:
    """numpy: the value with ``a`` values above it, ``a`` the largest with ``(a + 1) / (N + 1) <= fpr``."""
    count = values.size
    above = max(a for a in range(count) if (a + 1) / (count + 1) <= fpr + 1e-12)
    return float(np.sort(values, axis=None)[count - 1 - above]), above


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("normal_fpr_data"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, dataset_root, small_clip, released_prompts) -> dict[str, Any]:
    """AnomalyCLIP (released prompts) with normal_fpr, validated on the Folder data; its checkpoint."""
    root = tmp_path_factory.mktemp("normal_fpr_run")
    model = AnomalyCLIP(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"], normal_fpr=NORMAL_FPR)
    datamodule = folder_datamodule(dataset_root)
    engine = Engine(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.validate(model, datamodule=datamodule)
    checkpoint = root / "calibrated.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return {"model": model, "datamodule": datamodule, "engine": engine, "checkpoint": checkpoint}


def test_the_quantile_is_the_order_statistic_numpy_finds():
    generator = np.random.default_rng(1)
    for count, fpr in ((19, 0.05), (99, 0.01), (100, 0.01), (250, 0.03), (1000, 0.001), (37, 0.2)):
        values = generator.gamma(2.0, size=count)
        quantile = NormalQuantile.of(torch.from_numpy(values), fpr, "values")
        expected, above = order_statistic(values, fpr)
        assert quantile.value == expected
        assert quantile.above == above == int((values > quantile.value).sum())
        assert quantile.expected_rate <= fpr < (above + 2) / (count + 1)


def test_the_stated_intervals_hold_by_simulation():
    """Over many calibrations: the true rate lies in the rate interval and the count of flagged new values in the
    count interval about 95 % of the time, and the rate's mean is the stated one."""
    from scipy.stats import gamma

    generator = np.random.default_rng(2)
    count, fpr, new, trials = 59, 0.05, 200, 3000
    law = gamma(2.0)
    in_rate, in_count, rates = 0, 0, []
    for _ in range(trials):
        quantile = NormalQuantile.of(torch.from_numpy(law.rvs(count, random_state=generator)), fpr, "values")
        rate = float(law.sf(quantile.value))
        rates.append(rate)
        low, high = quantile.rate_interval()
        in_rate += low <= rate <= high
        flagged = int((law.rvs(new, random_state=generator) > quantile.value).sum())
        low_count, high_count = quantile.count_interval(new)
        in_count += low_count <= flagged <= high_count
    assert abs(np.mean(rates) - quantile.expected_rate) < 0.003
    assert 0.93 <= in_rate / trials <= 0.97
    assert in_count / trials >= 0.93


def test_the_module_examples_run():
    assert doctest.testmod(normal_quantile_module).failed == 0


def test_thresholds_are_the_order_statistics_of_the_validation_normal_images(calibrated):
    model, datamodule = calibrated["model"], calibrated["datamodule"]
    post_processor = model.post_processor
    assert isinstance(post_processor, NormalFPRPostProcessor)
    items = [datamodule.val_data[index] for index in range(len(datamodule.val_data))]
    normal = [item for item in items if int(item.gt_label) == 0]
    assert len(normal) < len(items), "the validation split should hold anomalous images too (left out)"
    scores, maps = raw_outputs(model, normal)
    image_threshold, above = order_statistic(scores, NORMAL_FPR)
    assert post_processor.normal_image_count.item() == len(normal)
    torch.testing.assert_close(post_processor._image_threshold.item(), image_threshold, rtol=0, atol=1e-6)
    assert (scores > post_processor._image_threshold.item() + 1e-6).sum() <= above
    pixel_threshold, _ = order_statistic(maps, NORMAL_FPR)
    torch.testing.assert_close(post_processor._pixel_threshold.item(), pixel_threshold, rtol=0, atol=1e-6)
    torch.testing.assert_close(post_processor.image_min.item(), float(scores.min()), rtol=0, atol=1e-6)
    torch.testing.assert_close(post_processor.image_max.item(), float(scores.max()), rtol=0, atol=1e-6)


def test_held_apart_normal_images_are_flagged_within_the_stated_interval(calibrated):
    model, datamodule, engine = calibrated["model"], calibrated["datamodule"], calibrated["engine"]
    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    labels = torch.cat([batch.pred_label.reshape(-1) for batch in predictions])
    truth = torch.cat([batch.gt_label.reshape(-1) for batch in predictions])
    items = [datamodule.test_data[index] for index in range(len(datamodule.test_data))]
    scores, _ = raw_outputs(model, items)
    threshold = model.post_processor._image_threshold.item()
    np.testing.assert_array_equal(labels.numpy(), scores > threshold)  # anomalib's labels: score > threshold
    normal = truth == 0
    val_normal = int(model.post_processor.normal_image_count.item())
    quantile = NormalQuantile.of(torch.arange(val_normal, dtype=torch.float32), NORMAL_FPR, "values")
    low, high = quantile.count_interval(int(normal.sum()))
    flagged = int(labels[normal].sum())
    assert low <= flagged <= high, f"{flagged} of {int(normal.sum())} held-apart normal images flagged"
    # Engine.test reports the rates at the threshold: scikit-learn's confusion matrix of the same labels.
    from sklearn.metrics import confusion_matrix

    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    tn, fp, fn, tp = confusion_matrix(truth.numpy(), labels.numpy(), labels=[0, 1]).ravel()
    assert metrics["image_FPR"] == pytest.approx(fp / (fp + tn), abs=1e-6)
    assert metrics["image_TPR"] == pytest.approx(tp / (tp + fn), abs=1e-6)


def test_a_false_positive_rate_without_normal_images_is_undefined_not_one():
    from anomalib.data import ImageBatch

    from anomalib_faprompt.components.metrics import threshold_rates, undefined_reason

    fpr, tpr = threshold_rates()
    batch = ImageBatch(image=torch.rand(3, 3, 8, 8), pred_label=torch.tensor([1, 0, 1]), gt_label=torch.ones(3).long())
    fpr.update(batch)
    tpr.update(batch)
    assert undefined_reason(fpr) == "its 3 images are all anomalous, and image_FPR needs normal ones"
    assert undefined_reason(tpr) is None
    assert tpr.compute().item() == pytest.approx(2 / 3)


def test_the_checkpoint_keeps_the_thresholds(calibrated):
    model = calibrated["model"]
    loaded = AnomalyCLIP.load_from_checkpoint(calibrated["checkpoint"])
    assert isinstance(loaded.post_processor, NormalFPRPostProcessor)
    assert loaded.post_processor.normal_fpr == NORMAL_FPR
    for name in ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
        assert getattr(loaded.post_processor, name).item() == getattr(model.post_processor, name).item(), name
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.eval()(images), loaded.eval()(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)


def test_the_exported_graphs_label_as_torch_does(calibrated, dataset_root, tmp_path):
    import onnxruntime
    import openvino

    model = calibrated["model"].eval()
    paths = sorted((dataset_root / "good").glob("*.png"))[:120] + sorted((dataset_root / "bad").glob("*.png"))
    every = np.stack([np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255 for path in paths])
    every = every.transpose(0, 3, 1, 2)
    with torch.no_grad():
        labels = model(torch.from_numpy(every)).pred_label.reshape(-1).numpy()
    # Images on both sides of the threshold (the random CLIP flags some normal ones and misses some anomalous ones).
    flagged, passed = np.flatnonzero(labels)[:6], np.flatnonzero(~labels)[:6]
    assert len(flagged) >= 2 and len(passed) >= 2, "pick images on both sides of the threshold"
    chosen = np.concatenate([flagged, passed])
    images = np.ascontiguousarray(every[chosen])
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
    onnx_path = model.to_onnx(tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images}), strict=True))
    compiled = openvino.Core().compile_model(openvino.convert_model(onnx_path), "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"})  # fmt: skip
    result = compiled(images)
    ov = {output.get_any_name(): result[output] for output in compiled.outputs}
    for outputs in (onnx, ov):
        np.testing.assert_array_equal(outputs["pred_label"].reshape(-1), expected.pred_label.numpy().reshape(-1))
        mismatched = (outputs["pred_mask"].reshape(-1) != expected.pred_mask.numpy().reshape(-1)).mean()
        assert mismatched < 1e-4  # pixels within rounding of the threshold may differ


def test_a_test_that_does_not_validate_calibrates_on_the_validation_split(calibrated, small_clip, released_prompts,
                                                                         tmp_path):  # fmt: skip
    """``anomalib test --ckpt_path`` does not validate: the thresholds still come from the validation split."""
    model = AnomalyCLIP(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"], normal_fpr=0.1)
    datamodule = calibrated["datamodule"]
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.test(model, datamodule=datamodule, ckpt_path=calibrated["checkpoint"], verbose=False)
    items = [datamodule.val_data[index] for index in range(len(datamodule.val_data))]
    scores, _ = raw_outputs(model, [item for item in items if int(item.gt_label) == 0])
    assert model.post_processor.calibrated
    torch.testing.assert_close(model.post_processor._image_threshold.item(), order_statistic(scores, 0.1)[0],
                               rtol=0, atol=1e-6)  # fmt: skip


def test_a_folder_with_too_few_images_is_refused_at_construction(small_clip, dataset_root, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for path in sorted((dataset_root / "good").glob("*.png"))[:8]:
        (folder / path.name).write_bytes(path.read_bytes())
    expected = r"normal_fpr=0.1 needs at least 9 normal images \(in normal_images '.*few'\).*; 8 were given"
    with pytest.raises(ValueError, match=expected):
        AnomalyCLIP(**small_clip, normal_fpr=0.1, normal_images=folder)


def test_too_few_normal_images_are_refused_naming_both_numbers(small_clip, released_prompts, dataset_root, tmp_path):
    model = AnomalyCLIP(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"], normal_fpr=0.001)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"normal_fpr=0.001 needs at least 999 normal images .*; \d+ were given"):
        engine.validate(model, datamodule=folder_datamodule(dataset_root))


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"normal_fpr": 0.0}, ValueError, "normal_fpr must be a false-positive rate strictly between 0 and 1"),
        ({"normal_fpr": 1.5}, ValueError, "normal_fpr must be .* got 1.5"),
        ({"normal_fpr": "0.01"}, ValueError, "normal_fpr must be .* got '0.01'"),
        ({"normal_fpr": 0.01, "normal_images": "/no/such/folder"}, FileNotFoundError, "normal_images '/no/such"),
        ({"normal_images": "."}, ValueError, "normal_images is only used with normal_fpr"),
        ({"normal_fpr": 0.01, "post_processor": False}, ValueError, "normal_fpr=0.01 sets the thresholds through"),
    ],
)
def test_settings_are_refused_at_construction(small_clip, settings, error, message):
    with pytest.raises(error, match=message):
        AnomalyCLIP(**small_clip, **settings)
    if "post_processor" not in settings and "normal_fpr" in settings:
        with pytest.raises(error, match=message):
            NormalFPRPostProcessor(**settings)


def test_a_folder_of_normal_images_sets_them_when_predicting(small_clip, released_prompts, dataset_root, tmp_path):
    folder = dataset_root / "good"
    model = AnomalyCLIP(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"], normal_fpr=NORMAL_FPR,
                        normal_images=folder)  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.predict(model, data_path=dataset_root / "bad")
    dataset = PredictDataset(folder)
    scores, _ = raw_outputs(model, [dataset[index] for index in range(len(dataset))])
    assert model.post_processor.normal_image_count.item() == NORMAL_IMAGES
    torch.testing.assert_close(model.post_processor._image_threshold.item(), order_statistic(scores, NORMAL_FPR)[0],
                               rtol=0, atol=1e-6)  # fmt: skip


def patchcore(**post_processor: Any) -> Any:
    """A small PatchCore (random ResNet-18, 64-pixel inputs: its coreset search grows with the patches)."""
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    return Patchcore(backbone="resnet18", layers=["layer2"], pre_trained=False, coreset_sampling_ratio=0.01,
                     pre_processor=PreProcessor(transform=Resize((64, 64))),
                     post_processor=NormalFPRPostProcessor(**post_processor))  # fmt: skip


def test_patchcore_gets_thresholds_from_normal_images(dataset_root, tmp_path):
    torch.manual_seed(0)
    model = patchcore(normal_fpr=NORMAL_FPR)
    datamodule = folder_datamodule(dataset_root)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    items = [datamodule.val_data[index] for index in range(len(datamodule.val_data))]
    normal = [item for item in items if int(item.gt_label) == 0]
    images = torch.stack([model.pre_processor.transform(item.image) for item in normal])
    with torch.no_grad():
        scores = model.model.eval()(images).pred_score.reshape(-1).numpy()
    torch.testing.assert_close(model.post_processor._image_threshold.item(), order_statistic(scores, NORMAL_FPR)[0],
                               rtol=0, atol=1e-5)  # fmt: skip


def test_anomalib_train_takes_it_as_patchcores_post_processor(dataset_root, tmp_path):
    from anomalib.cli.cli import AnomalibCLI

    cli = AnomalibCLI(
        ["fit", "--model", "Patchcore", "--model.backbone", "resnet18", "--model.layers", "[layer2]",
         "--model.pre_trained", "false", "--model.post_processor", "anomalib_faprompt.NormalFPRPostProcessor",
         "--model.post_processor.normal_fpr", "0.02", "--data", "Folder", "--data.name", "textures",
         "--data.root", str(dataset_root), "--data.normal_dir", "good", "--default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    post_processor = cli.model.post_processor
    assert isinstance(post_processor, NormalFPRPostProcessor)
    assert post_processor.normal_fpr == 0.02
