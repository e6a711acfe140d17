"""Mixed precision: only the vision encoder runs in 16 bits (similarities, softmax, text, prior, smoothing stay fp32).

AnomalyCLIP's outputs are continuous in the vision features and stay within 1e-2 of fp32. FAPrompt also feeds its
M most abnormal patches, most abnormal first, to its prior network, whose output depends on that order: 16-bit
features move each patch's static abnormal probability by about one unit of 16-bit roundoff, which can swap patches
that fp32 ranks closer than that, and one swap moves the score by several hundredths on the random small CLIP of
these tests. Whether a swap happens depends on the CPU's 16-bit kernels (bf16 swaps two pairs of the fixtures on a
CPU without AVX512, fp16 swapped one on an AMX CPU), so FAPrompt is checked in parts that hold on any CPU: given the
patches the mixed run selected, fp32 agrees with it within 1e-2; the static probabilities move by at most a few
units of roundoff, and only patches that fp32 ranks within twice that shift change places.
"""

from __future__ import annotations

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_faprompt.components import patch_similarity
from anomalib_faprompt.methods import METHODS as METHOD_LIST

#: The methods with released prompts (the fixtures hold them in the released format).
METHODS = {name: method.load() for name, method in METHOD_LIST.items() if method.released_prompts is not None}
BOUND = 1e-2
#: Unit roundoff of each 16-bit format (fp16: 10 stored mantissa bits, bf16: 7).
ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: Largest shift of a static abnormal probability, in units of roundoff. Measured: 1.2 (fp16) and 1.3 (bf16) with
#: CPU autocast, 1.2 and 1.1 with every vision weight and intermediate rounded to 16 bits and computed in fp32.
SHIFT_IN_ROUNDOFFS = 5


def make_model(method, small_clip, released_prompts):
    extra = {"feature_layers": (2, 4, 6, 8)} if method == "AnomalyCLIP" else {}
    return METHODS[method](**small_clip, **extra, prompt_weights=released_prompts[method])


class PatchSelection:
    """Records which patches FAPrompt feeds its prior network, in order, and can make it feed others.

    Hooks ``encode_image`` (to keep the run's patch features) and the prior network's input (to find which of
    those features it received), so the model runs its own code unchanged.
    """

    def __init__(self, model, monkeypatch: pytest.MonkeyPatch) -> None:
        self.features: torch.Tensor | None = None  # patch features of the last run (B, N, E)
        self.indices: torch.Tensor | None = None  # patches the prior network received, most abnormal first (B, M)
        self.forced: torch.Tensor | None = None  # patches to feed it instead (B, M)
        encode_image = model.encode_image

        def recording(images, feature_layers):
            image_features, patch_features = encode_image(images, feature_layers)
            self.features = patch_features[0]
            return image_features, patch_features

        monkeypatch.setattr(model, "encode_image", recording)
        model.prior.register_forward_pre_hook(self._prior_input)

    def _prior_input(self, module, args):
        (selected,) = args
        features = self.features
        rows = selected.view(features.shape[0], -1, features.shape[-1])
        matches = (rows[:, :, None, :] == features[:, None, :, :]).all(dim=-1)  # (B, M, N)
        assert (matches.sum(dim=-1) == 1).all(), "each selected feature is exactly one patch's"
        self.indices = matches.int().argmax(dim=-1)
        if self.forced is None:
            return None
        forced = torch.gather(features, 1, self.forced[..., None].expand(-1, -1, features.shape[-1]))
        return (forced.flatten(1),)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_anomalyclip_autocast_scores_match_fp32(dtype, small_clip, released_prompts, anomalyclip_golden):
    model = make_model("AnomalyCLIP", small_clip, released_prompts).model.eval()
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(images)
    assert mixed.pred_score.dtype == torch.float32
    assert mixed.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(mixed.pred_score, reference.pred_score, atol=BOUND, rtol=0)
    # The map sums one probability map per feature layer: 1e-2 per layer.
    atol = BOUND * len(model.feature_layers)
    torch.testing.assert_close(mixed.anomaly_map, reference.anomaly_map, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_faprompt_autocast_matches_fp32_given_the_same_patches(
    dtype, small_clip, released_prompts, anomalyclip_golden, monkeypatch
):
    """Everything but the choice and order of the top-M patches stays within 1e-2 of fp32."""
    model = make_model("FAPrompt", small_clip, released_prompts).model.eval()
    selection = PatchSelection(model, monkeypatch)
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        reference = model(images)
        own_patches = selection.indices
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(images)
        selection.forced = selection.indices
        fp32_with_mixed_patches = model(images)
        selection.forced = own_patches
        fp32_forced_to_its_own_patches = model(images)
    # Forcing the patches a run selects anyway changes nothing.
    assert torch.equal(fp32_forced_to_its_own_patches.pred_score, reference.pred_score)
    assert mixed.pred_score.dtype == torch.float32
    assert mixed.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(mixed.pred_score, fp32_with_mixed_patches.pred_score, atol=BOUND, rtol=0)
    torch.testing.assert_close(mixed.anomaly_map, fp32_with_mixed_patches.anomaly_map, atol=BOUND, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_faprompt_autocast_reorders_only_near_tied_patches(
    dtype, small_clip, released_prompts, anomalyclip_golden, monkeypatch
):
    """16-bit features move each static abnormal probability by a few roundoffs; only near-ties change places."""
    model = make_model("FAPrompt", small_clip, released_prompts).model.eval()
    selection = PatchSelection(model, monkeypatch)
    images = anomalyclip_golden["inputs"]["images"]
    with torch.no_grad():
        model(images)
        fp32_features, fp32_patches = selection.features, selection.indices
        with torch.autocast("cpu", dtype=dtype):
            model(images)
        mixed_features, mixed_patches = selection.features, selection.indices
        text = model.cached(model.encode_static_text).pair
        fp32_probabilities = patch_similarity(fp32_features, text, model.temperature)[..., 1]
        mixed_probabilities = patch_similarity(mixed_features, text, model.temperature)[..., 1]
    shift = (mixed_probabilities - fp32_probabilities).abs().max()
    assert 0 < shift <= SHIFT_IN_ROUNDOFFS * ROUNDOFF[dtype], f"{shift / ROUNDOFF[dtype]:.2f} roundoffs"
    # The mixed run ranks by its own probabilities: at any rank where it put another patch than fp32, fp32 ranks
    # that patch within 2 x shift of its own (each probability and each order statistic moved by <= shift).
    moved = mixed_patches != fp32_patches
    gaps = (fp32_probabilities.gather(1, mixed_patches) - fp32_probabilities.gather(1, fp32_patches)).abs()
    assert (gaps[moved] <= 2 * shift).all(), (gaps[moved], shift)


def test_faprompt_score_depends_on_the_order_of_its_patches(
    small_clip, released_prompts, anomalyclip_golden, monkeypatch
):
    """Why FAPrompt's mixed-precision score has no 1e-2 bound: swapping the two closest of its top-M patches in fp32
    (3e-4 apart in static probability on the first fixture image) moves the score by more than 1e-2."""
    model = make_model("FAPrompt", small_clip, released_prompts).model.eval()
    selection = PatchSelection(model, monkeypatch)
    images = anomalyclip_golden["inputs"]["images"][:1]
    with torch.no_grad():
        reference = model(images)
        patches, features = selection.indices, selection.features
        text = model.cached(model.encode_static_text).pair
        ranked = patch_similarity(features, text, model.temperature)[..., 1].gather(1, patches)[0]
        closest = int((ranked[:-1] - ranked[1:]).argmin())
        swapped = patches.clone()
        swapped[0, [closest, closest + 1]] = patches[0, [closest + 1, closest]]
        selection.forced = swapped
        reordered = model(images)
    assert ranked[closest] - ranked[closest + 1] < 1e-3
    assert (reordered.pred_score - reference.pred_score).abs().max() > BOUND


@pytest.mark.parametrize("method", list(METHODS))
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
    """``Engine(precision="bf16-mixed")`` tests the model under autocast, and its outputs stay within the bound above.

    Compared on the model's raw outputs, not on metrics: among these six images a normal and an anomalous score lie
    6e-4 apart, so bf16 noise could swap them and move the image AUROC by 1/9 on some CPUs and not on others (and the
    post-processor's normalisation stretches the few hundredths these scores span to [0, 1]).
    """
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=3, num_workers=0)
    outputs = {}
    for precision in ("32-true", "bf16-mixed"):
        module = make_model("AnomalyCLIP", small_clip, released_prompts)
        batches: list = []
        module.model.register_forward_hook(lambda _module, _args, output, batches=batches: batches.append(output))
        Engine(default_root_dir=tmp_path / precision, accelerator="cpu", precision=precision).test(
            module, datamodule=datamodule
        )
        outputs[precision] = {
            key: torch.cat([getattr(batch, key) for batch in batches]) for key in ("pred_score", "anomaly_map")
        }
    reference, mixed = outputs["32-true"], outputs["bf16-mixed"]
    # Every image the engine scored: validation (for thresholds), then test.
    assert len(mixed["pred_score"]) == len(reference["pred_score"]) >= 6
    assert mixed["pred_score"].dtype == torch.float32
    assert not torch.equal(mixed["anomaly_map"], reference["anomaly_map"])  # bf16 did run
    torch.testing.assert_close(mixed["pred_score"], reference["pred_score"], atol=BOUND, rtol=0)
    torch.testing.assert_close(mixed["anomaly_map"], reference["anomaly_map"], atol=4 * BOUND, rtol=0)
