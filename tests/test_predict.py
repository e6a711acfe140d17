"""``anomalib predict`` and ``Engine.predict`` on a folder or an image write one heat-map overlay per image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.data import PredictDataset
from anomalib.engine import Engine
from lightning.pytorch import Trainer

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.prompt_weights import load_prompt_weights

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}


def make_model(method: str, small_clip, **kwargs):
    extra = {"feature_layers": (2, 4, 6, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, **kwargs)


def written_images(root: Path) -> list[Path]:
    """Visualisations anomalib's ImageVisualizer wrote under ``root`` (``<root>/.../images/...``)."""
    return sorted(path for path in root.rglob("*.png") if "images" in path.parts)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_cli_predict_on_a_folder_writes_one_visualisation_per_image(
    method, small_clip, released_prompts, tiny_mvtec, tmp_path
):
    folder = tiny_mvtec / "widget" / "test" / "spot"
    model = make_model(method, small_clip)
    load_prompt_weights(model.model, released_prompts[method], method)  # as if trained
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)

    extra = ["--model.feature_layers", "[2, 4, 6, 8]"] if method == "AnomalyCLIP" else []
    command = [
        str(Path(sys.executable).with_name("anomalib")), "predict", "--model", method,
        "--model.backbone", small_clip["backbone"], "--model.pretrained", small_clip["pretrained"],
        "--model.image_size", "224", "--model.dpam_layers", "6", *extra,
        "--ckpt_path", str(checkpoint), "--data", str(folder), "--default_root_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    written = written_images(tmp_path / "out")
    assert [path.name for path in written] == sorted(path.name for path in folder.glob("*.png"))
    # Image, image + anomaly map, image + predicted mask side by side.
    from PIL import Image

    with Image.open(written[0]) as image:
        assert image.width > image.height


def test_engine_predict_on_an_image_returns_maps_and_writes_its_overlay(
    small_clip, released_prompts, tiny_mvtec, tmp_path
):
    image = tiny_mvtec / "widget" / "test" / "spot" / "000.png"
    model = make_model("FAPrompt", small_clip, prompt_weights=released_prompts["FAPrompt"])
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    # A zero-shot model with nothing to calibrate on: anomalib validates first, finds no data, predicts anyway.
    (prediction,) = engine.predict(model, data_path=image, return_predictions=True)
    assert prediction.anomaly_map.shape[-2:] == (224, 224)
    assert prediction.pred_score.shape == (1,)
    # Uncalibrated: the scores and maps are the model's probabilities, labels and masks threshold them at 0.5.
    model.eval()
    with torch.no_grad():  # the same input: PredictDataset (resizes to 256), then the transform
        raw = model.model(model.pre_processor.transform(PredictDataset(image)[0].image[None]))
    torch.testing.assert_close(prediction.pred_score, raw.pred_score, atol=1e-6, rtol=0)
    torch.testing.assert_close(prediction.anomaly_map.reshape(-1), raw.anomaly_map.reshape(-1), atol=1e-6, rtol=0)
    assert prediction.pred_label.dtype == torch.bool
    assert prediction.pred_label.item() == (raw.pred_score.item() > 0.5)
    assert torch.equal(prediction.pred_mask.reshape(-1), (raw.anomaly_map > 0.5).reshape(-1))
    assert [path.name for path in written_images(tmp_path)] == [image.name]
