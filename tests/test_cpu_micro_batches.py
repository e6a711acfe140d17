"""CPU micro-batches of the vision encoder: same features as one pass, as costly per image as batch 1.

The speed side is measured by ``benchmarks/benchmark.py`` (batch-8 over batch-1 seconds per image); here the
features of a micro-batched pass are checked against one whole-batch pass and against each image alone.
"""

from __future__ import annotations

import pytest
import torch

from anomalib_faprompt.clip import DPAMVisionEncoder, build_clip


@pytest.fixture(scope="module")
def encoder(small_clip) -> DPAMVisionEncoder:
    visual = build_clip(small_clip["backbone"], small_clip["pretrained"]).visual
    return DPAMVisionEncoder(visual, dpam_layers=small_clip["dpam_layers"]).eval()


def encode(encoder, images, micro_batch_tokens, monkeypatch):
    monkeypatch.setattr(DPAMVisionEncoder, "cpu_micro_batch_tokens", micro_batch_tokens)
    with torch.no_grad():
        return encoder.encode(images, feature_layers=(1, encoder.depth), residual_layers=(encoder.depth,))


def flat(features) -> list[torch.Tensor]:
    return [features.image_features, *features.patch_features, *features.residual_features]


def test_micro_batches_give_the_features_of_one_pass_and_of_each_image_alone(encoder, monkeypatch):
    size = 224
    torch.manual_seed(0)
    images = torch.randn(5, 3, size, size)
    tokens = (size // encoder.patch_size) ** 2 + 1
    assert encoder.cpu_micro_batch(images) >= 1
    whole = encode(encoder, images, 10**9, monkeypatch)
    monkeypatch.setattr(DPAMVisionEncoder, "cpu_micro_batch_tokens", 2 * tokens)
    assert encoder.cpu_micro_batch(images) == 2  # 5 images in micro-batches of 2, 2 and 1
    chunked = encode(encoder, images, 2 * tokens, monkeypatch)
    alone = [encode(encoder, image[None], 10**9, monkeypatch) for image in images]
    for name, ours, reference in zip(
        ("image", "patch 1", "patch last", "residual"), flat(chunked), flat(whole), strict=True
    ):
        assert ours.shape == reference.shape, name
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5, msg=name)
    for index, single in enumerate(alone):
        for ours, reference in zip(flat(chunked), flat(single), strict=True):
            torch.testing.assert_close(ours[index : index + 1], reference, rtol=0, atol=1e-5)


def test_micro_batch_size_follows_the_token_budget(encoder, monkeypatch):
    monkeypatch.setattr(DPAMVisionEncoder, "cpu_micro_batch_tokens", 2048)
    patch = encoder.patch_size
    # 1025 tokens (a 32 × 32 grid): one image per micro-batch; 197 tokens: ten.
    assert encoder.cpu_micro_batch(torch.empty(8, 3, 32 * patch, 32 * patch)) == 1
    assert encoder.cpu_micro_batch(torch.empty(16, 3, 14 * patch, 14 * patch)) == 10
    # A GPU takes the batch whole (checked on the meta device, which is not a CPU either).
    assert encoder.cpu_micro_batch(torch.empty(8, 3, 32 * patch, 32 * patch, device="meta")) == 8
