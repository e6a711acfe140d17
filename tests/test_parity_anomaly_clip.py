"""AnomalyCLIP through the public classes against the authors' release (golden fixture)."""

from __future__ import annotations

import pytest
import torch

from anomalib_faprompt import AnomalyCLIP

ATOL = 1e-4
GRAD_RTOL = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def model_factory(small_clip, anomalyclip_golden, released_prompts):
    settings = anomalyclip_golden["settings"]

    def make(sigma: float = 0.0) -> AnomalyCLIP:
        return AnomalyCLIP(
            **small_clip,
            feature_layers=settings["feature_layers"],
            n_ctx=settings["n_ctx"],
            text_depth=settings["text_depth"],
            text_n_ctx=settings["text_n_ctx"],
            sigma=sigma,
            prompt_weights=released_prompts["AnomalyCLIP"],
        )

    return make


def test_inference_matches_release(model_factory, anomalyclip_golden):
    expected = anomalyclip_golden["expected"]
    images = anomalyclip_golden["inputs"]["images"]
    model = model_factory(sigma=0.0).model.eval()
    with torch.no_grad():
        features = model.forward_features(images)
        output = model(images)
    torch.testing.assert_close(features.text_features, expected["text_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(features.image_features, expected["image_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.pred_score, expected["pred_score"], atol=ATOL, rtol=0)
    layer_maps = torch.stack([maps[:, 1] for maps in features.layer_maps])
    torch.testing.assert_close(layer_maps, expected["layer_maps"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.anomaly_map, expected["anomaly_map_raw"], atol=ATOL, rtol=0)


def test_smoothed_map_matches_release(model_factory, anomalyclip_golden):
    model = model_factory(sigma=4.0).model.eval()
    with torch.no_grad():
        output = model(anomalyclip_golden["inputs"]["images"])
    torch.testing.assert_close(
        output.anomaly_map, anomalyclip_golden["expected"]["anomaly_map_sigma4"], atol=ATOL, rtol=0
    )


def test_training_step_losses_and_gradients_match_release(model_factory, anomalyclip_golden):
    expected = anomalyclip_golden["expected"]
    inputs = anomalyclip_golden["inputs"]
    lightning_model = model_factory()
    model = lightning_model.model.train()
    losses = lightning_model.training_losses(inputs["images"], inputs["masks"], inputs["labels"])
    for name in ("loss_local", "loss_image"):
        assert losses[name].item() == pytest.approx(expected[name].item(), abs=ATOL), name
    assert losses["loss"].item() == pytest.approx(expected["loss_total"].item(), abs=ATOL)
    losses["loss"].backward()
    assert (
        relative_error(model.normal_context.grad, expected["grad_ctx_pos"].reshape(model.normal_context.shape))
        < GRAD_RTOL
    )
    assert (
        relative_error(model.abnormal_context.grad, expected["grad_ctx_neg"].reshape(model.abnormal_context.shape))
        < GRAD_RTOL
    )
    assert relative_error(model.deep_prompts[0].grad, expected["grad_deep_0"]) < GRAD_RTOL
    # Only prompts learn: the frozen CLIP gets no gradient.
    assert all(p.grad is None for p in model.vision.parameters())
