"""Mixed precision keeps scores within 1e-2 of fp32 (similarities, softmax, text, smoothing stay fp32)."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_faprompt import AnomalyCLIP, FAPrompt

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}
BF16_SELECTION_FLIPS = pytest.mark.xfail(
    strict=True,
    reason="bf16's 7-bit mantissa perturbs patch features by ~3e-3, enough to flip FAPrompt's top-M patch "
    "selection between near-tied patches of the random small CLIP, which moves Ω and the score by ~0.07; "
    "fp16 ('16-mixed') keeps it within 2e-4",
)


def make_model(method, small_clip, released_prompts):
    extra = {"feature_layers": (2, 4, 6, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, prompt_weights=released_prompts[method])


@pytest.mark.parametrize(
    ("method", "dtype"),
    [
        ("AnomalyCLIP", torch.float16),
        ("AnomalyCLIP", torch.bfloat16),
        ("FAPrompt", torch.float16),
        pytest.param("FAPrompt", torch.bfloat16, marks=BF16_SELECTION_FLIPS),
    ],
)
def test_autocast_scores_match_fp32(method, dtype, small_clip, released_prompts, anomalyclip_golden):
    model = make_model(method, small_clip, released_prompts).model.eval()
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(images)
    assert mixed.pred_score.dtype == torch.float32
    assert mixed.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(mixed.pred_score, reference.pred_score, atol=1e-2, rtol=0)
    # AnomalyCLIP's map sums one probability map per feature layer: 1e-2 per layer.
    summed_layers = len(model.feature_layers) if method == "AnomalyCLIP" else 1
    torch.testing.assert_close(mixed.anomaly_map, reference.anomaly_map, atol=1e-2 * summed_layers, rtol=0)


@pytest.mark.parametrize("method", ["AnomalyCLIP", "FAPrompt"])
def test_autocast_training_losses_are_fp32_and_close(method, small_clip, released_prompts, anomalyclip_golden):
    module = make_model(method, small_clip, released_prompts)
    images = anomalyclip_golden["inputs"]["images"][:2]
    masks = torch.zeros(2, *images.shape[-2:])
    masks[0, 8:24, 8:24] = 1
    labels = torch.tensor([1, 0])
    module.model.train()
    reference = module.training_losses(images, masks, labels)
    with torch.autocast("cpu", dtype=torch.float16):
        mixed = module.training_losses(images, masks, labels)
    mixed["loss"].backward()
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
    assert all(torch.isfinite(p.grad).all() for p in module.model.learnable_parameters() if p.grad is not None)
    torch.testing.assert_close(mixed["loss"], reference["loss"], rtol=1e-2, atol=1e-3)


def test_lightning_mixed_precision_runs_end_to_end(small_clip, released_prompts, tiny_mvtec, tmp_path):
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=3, num_workers=0)
    reference = Engine(default_root_dir=tmp_path / "fp32", accelerator="cpu").test(
        make_model("AnomalyCLIP", small_clip, released_prompts), datamodule=datamodule
    )[0]
    engine = Engine(default_root_dir=tmp_path / "bf16", accelerator="cpu", precision="bf16-mixed")
    mixed = engine.test(make_model("AnomalyCLIP", small_clip, released_prompts), datamodule=datamodule)[0]
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert mixed[metric] == pytest.approx(reference[metric], abs=1e-2), metric
