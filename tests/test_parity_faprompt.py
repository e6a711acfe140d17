"""FAPrompt through the public classes against the authors' release (golden fixture)."""

from __future__ import annotations

import pytest
import torch

from anomalib_faprompt import FAPrompt

ATOL = 1e-4
GRAD_RTOL = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def model_factory(small_clip, faprompt_golden, released_prompts):
    settings = faprompt_golden["settings"]

    def make(sigma: float = 0.0) -> FAPrompt:
        return FAPrompt(
            **small_clip,
            text_depth=settings["text_depth"],
            text_n_ctx=settings["text_n_ctx"],
            sigma=sigma,
            prompt_weights=released_prompts["FAPrompt"],
        )

    return make


def test_text_and_dap_intermediates_match_release(model_factory, faprompt_golden):
    expected = faprompt_golden["expected"]
    model = model_factory().model.eval()
    with torch.no_grad():
        features = model.forward_features(faprompt_golden["inputs"]["images"])
    static = features.static_text
    torch.testing.assert_close(static.normal, expected["text_normal"], atol=ATOL, rtol=0)
    torch.testing.assert_close(static.abnormal_each, expected["text_abnormal_each"], atol=ATOL, rtol=0)
    torch.testing.assert_close(static.pair, expected["text_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(features.selected_patches, expected["dap_selected_tokens"], atol=ATOL, rtol=0)
    torch.testing.assert_close(features.prior, expected["dap_bias"], atol=ATOL, rtol=0)
    torch.testing.assert_close(features.static_maps[:, 1], expected["map_static_abnormal"], atol=ATOL, rtol=0)
    torch.testing.assert_close(features.dap_maps[:, 1], expected["map_dap_abnormal"], atol=ATOL, rtol=0)


def test_scores_and_maps_match_release(model_factory, faprompt_golden):
    expected = faprompt_golden["expected"]
    images = faprompt_golden["inputs"]["images"]
    with torch.no_grad():
        raw = model_factory(sigma=0.0).model.eval()(images)
        smoothed = model_factory(sigma=10.0).model.eval()(images)
    torch.testing.assert_close(raw.pred_score, expected["pred_score"], atol=ATOL, rtol=0)
    torch.testing.assert_close(raw.anomaly_map, expected["anomaly_map_raw"], atol=ATOL, rtol=0)
    torch.testing.assert_close(smoothed.anomaly_map, expected["anomaly_map_sigma10"], atol=ATOL, rtol=0)


def test_training_step_losses_and_gradients_match_release(model_factory, faprompt_golden):
    expected = faprompt_golden["expected"]
    inputs = faprompt_golden["inputs"]
    lightning_model = model_factory()
    model = lightning_model.model.train()
    losses = lightning_model.training_losses(inputs["images"], inputs["masks"], inputs["labels"])
    for name in ("loss_local", "loss_image", "loss_image2", "loss_orth", "loss_prior"):
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
    assert relative_error(model.prior[2].weight.grad, expected["grad_prior_linear2_weight"]) < GRAD_RTOL
