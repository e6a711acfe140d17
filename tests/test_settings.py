"""Model settings: AnomalyCLIP's released default layers, and bad values refused at construction.

Every bad value must be refused with a ``ValueError`` naming the setting, the value and the valid
range, before any CLIP weights are loaded (``build_clip`` is made to fail here if it is called).
"""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.components import GaussianSmoothing
from anomalib_faprompt.models.anomaly_clip.torch_model import AnomalyCLIPModel
from anomalib_faprompt.models.faprompt.torch_model import FAPromptModel

# The small CLIP of the fixtures: 8 vision blocks, patch 14 (a 16 x 16 grid at 224), 12 text blocks, 77 tokens.
SMALL_DEPTH = 8


def assert_names_the_setting(message: str, setting: str, valid: str, value: object) -> None:
    """The refusal names the setting, its valid range and the value given."""
    assert f"{setting} must be " in message
    assert valid in message
    assert f"got {value!r}" in message


@pytest.fixture
def no_download(monkeypatch):
    """Fail on any attempt to fetch CLIP weights."""
    import open_clip.pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download CLIP weights")

    monkeypatch.setattr("anomalib_faprompt.clip.loading._download_tag", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", refuse)


# AnomalyCLIP's default feature layers -----------------------------------------------------------------------


def test_default_feature_layers_are_the_last_block_of_the_small_clip(small_clip, released_prompts, tmp_path):
    model = AnomalyCLIP(**small_clip, prompt_weights=released_prompts["AnomalyCLIP"])
    assert model.model.feature_layers == (SMALL_DEPTH,)
    assert model.hparams["feature_layers"] == [SMALL_DEPTH]
    # One summed layer: maps are probabilities in [0, 1], and the default thresholds say so.
    assert model.post_processor.pixel_max.item() == 1.0
    saved = torch.load(model.save_prompt_weights(tmp_path / "prompts.pt"), weights_only=True)
    assert saved["settings"]["feature_layers"] == [SMALL_DEPTH]
    # The recorded settings rebuild the same model.
    assert AnomalyCLIP(**{**small_clip, "feature_layers": model.hparams["feature_layers"]}).model.feature_layers == (
        SMALL_DEPTH,
    )


def test_default_feature_layers_are_the_last_block_of_vit_b16(no_download):
    model = AnomalyCLIP(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10)
    assert model.model.vision.depth == 12
    assert model.model.feature_layers == (12,)
    assert model.hparams["feature_layers"] == [12]


def test_torch_model_defaults_to_the_last_block_too(small_clip):
    assert AnomalyCLIPModel(**small_clip).feature_layers == (SMALL_DEPTH,)


def test_the_papers_four_layers_are_one_setting_away(small_clip):
    model = AnomalyCLIP(**small_clip, feature_layers=[2, 4, 6, 8])
    assert model.model.feature_layers == (2, 4, 6, 8)
    assert model.hparams["feature_layers"] == [2, 4, 6, 8]
    assert model.post_processor.pixel_max.item() == 4.0


def test_default_layer_maps_come_from_the_last_block(small_clip, released_prompts, anomalyclip_golden):
    """The default model's map is the golden fixture's layer-8 map (the fixture computed layers 2, 4, 6, 8)."""
    assert anomalyclip_golden["settings"]["feature_layers"][-1] == SMALL_DEPTH
    model = AnomalyCLIP(**small_clip, sigma=0.0, prompt_weights=released_prompts["AnomalyCLIP"]).model.eval()
    with torch.no_grad():
        output = model(anomalyclip_golden["inputs"]["images"])
    expected = anomalyclip_golden["expected"]["layer_maps"][-1]
    torch.testing.assert_close(output.anomaly_map, expected, atol=1e-4, rtol=0)


def test_faprompt_uses_the_last_block(small_clip):
    assert FAPrompt(**small_clip).model.feature_layers == (SMALL_DEPTH,)


# Bad settings -----------------------------------------------------------------------------------------------


@pytest.fixture
def clip_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CLIP was built before the settings were checked")

    monkeypatch.setattr("anomalib_faprompt.clip.prompted_clip.build_clip", refuse)


BLOCKS = f"1..{SMALL_DEPTH}"

# (model, setting, bad value, the valid range as the message states it)
BAD_SETTINGS = [
    ("AnomalyCLIP", "image_size", 0, "an integer >= 1"),
    ("AnomalyCLIP", "image_size", -224, "an integer >= 1"),
    ("AnomalyCLIP", "image_size", 224.0, "an integer >= 1"),
    ("AnomalyCLIP", "image_size", 225, "a multiple of the backbone's patch size 14"),
    ("FAPrompt", "image_size", 0, "an integer >= 1"),
    ("AnomalyCLIP", "feature_layers", [], BLOCKS),
    ("AnomalyCLIP", "feature_layers", [0], BLOCKS),
    ("AnomalyCLIP", "feature_layers", [9], BLOCKS),
    ("AnomalyCLIP", "feature_layers", [2, 2], "distinct integers"),
    ("AnomalyCLIP", "feature_layers", [2.5], BLOCKS),
    ("AnomalyCLIP", "feature_layers", ["8"], BLOCKS),
    ("AnomalyCLIP", "feature_layers", 8, BLOCKS),
    ("AnomalyCLIP", "feature_layers", [True], BLOCKS),
    ("AnomalyCLIP", "dpam_layers", 0, BLOCKS),
    ("AnomalyCLIP", "dpam_layers", 9, BLOCKS),
    ("FAPrompt", "dpam_layers", 9, BLOCKS),
    ("AnomalyCLIP", "n_ctx", 0, "1..72"),
    ("AnomalyCLIP", "n_ctx", 73, "1..72"),
    ("AnomalyCLIP", "text_depth", 0, "1..12"),
    ("AnomalyCLIP", "text_depth", 13, "1..12"),
    ("FAPrompt", "text_depth", 13, "1..12"),
    ("AnomalyCLIP", "text_n_ctx", 0, "1..76"),
    ("AnomalyCLIP", "text_n_ctx", 77, "1..76"),
    ("AnomalyCLIP", "sigma", -1.0, "0..56"),
    ("AnomalyCLIP", "sigma", math.nan, "0..56"),
    ("AnomalyCLIP", "sigma", math.inf, "0..56"),
    ("AnomalyCLIP", "sigma", 100.0, "0..56"),
    ("FAPrompt", "sigma", -1.0, "0..56"),
    ("FAPrompt", "sigma", math.nan, "0..56"),
    ("AnomalyCLIP", "learning_rate", 0.0, "> 0"),
    ("AnomalyCLIP", "learning_rate", -1e-3, "> 0"),
    ("AnomalyCLIP", "learning_rate", math.nan, "> 0"),
    ("FAPrompt", "learning_rate", math.inf, "> 0"),
    ("AnomalyCLIP", "betas", (0.5,), "two numbers in [0, 1)"),
    ("AnomalyCLIP", "betas", (0.5, 1.0), "two numbers in [0, 1)"),
    ("FAPrompt", "betas", (-0.1, 0.999), "two numbers in [0, 1)"),
    ("FAPrompt", "betas", (0.5, math.nan), "two numbers in [0, 1)"),
    ("AnomalyCLIP", "max_epochs", 0, "None (the trainer's value) or an integer >= 1"),
    ("FAPrompt", "max_epochs", 0, "None (the trainer's value) or an integer >= 1"),
    ("FAPrompt", "max_epochs", -1, "None (the trainer's value) or an integer >= 1"),
    ("FAPrompt", "max_epochs", 1.5, "None (the trainer's value) or an integer >= 1"),
    ("FAPrompt", "n_ctx_normal", 0, "1..71"),
    ("FAPrompt", "n_ctx_abnormal", 0, "1..67"),
    ("FAPrompt", "n_ctx_abnormal", 68, "1..67"),
    ("FAPrompt", "n_abnormal_prompts", 0, "an integer >= 1"),
    ("FAPrompt", "n_prior_patches", 0, "1..256"),
    ("FAPrompt", "n_prior_patches", 257, "1..256"),
]


@pytest.mark.parametrize(
    ("method", "setting", "value", "valid"),
    BAD_SETTINGS,
    ids=[f"{method}-{setting}={value!r}" for method, setting, value, _ in BAD_SETTINGS],
)
def test_bad_setting_is_refused_before_the_clip_loads(method, setting, value, valid, small_clip, clip_must_not_load):
    model_class = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}[method]
    with pytest.raises(ValueError) as error:
        model_class(**{**small_clip, setting: value})
    assert_names_the_setting(str(error.value), setting, valid, value)


@pytest.mark.parametrize(
    ("model_class", "setting", "value", "valid"),
    [
        (AnomalyCLIPModel, "temperature", 0.0, "> 0"),
        (AnomalyCLIPModel, "temperature", -0.07, "> 0"),
        (FAPromptModel, "temperature", math.nan, "> 0"),
        (AnomalyCLIPModel, "feature_layers", [9], BLOCKS),
        (AnomalyCLIPModel, "n_ctx", 0, "1..72"),
        (AnomalyCLIPModel, "image_size", -1, "an integer >= 1"),
        (FAPromptModel, "n_abnormal_prompts", 0, "an integer >= 1"),
        (FAPromptModel, "sigma", -2.0, "0..56"),
    ],
)
def test_torch_models_refuse_bad_settings_too(model_class, setting, value, valid, small_clip, clip_must_not_load):
    with pytest.raises(ValueError) as error:
        model_class(**{**small_clip, setting: value})
    assert_names_the_setting(str(error.value), setting, valid, value)


@pytest.mark.parametrize(
    ("setting", "value", "valid"),
    [("sigma", -1.0, ">= 0"), ("sigma", math.nan, ">= 0"), ("sigma", math.inf, ">= 0"), ("truncate", 0.0, "> 0")],
)
def test_smoothing_refuses_bad_settings(setting, value, valid):
    arguments = {"sigma": 4.0, setting: value}
    with pytest.raises(ValueError) as error:
        GaussianSmoothing(**arguments)
    assert_names_the_setting(str(error.value), setting, valid, value)


def test_smoothing_refuses_a_radius_larger_than_the_map():
    with pytest.raises(ValueError, match=r"sigma must be a finite number in 0\.\.16 .*64 px map.*got 16\.5"):
        GaussianSmoothing(sigma=16.5, max_size=64)
    assert GaussianSmoothing(sigma=16.0, max_size=64).radius == 64
    assert GaussianSmoothing(sigma=16.0, max_size=64)(torch.rand(1, 64, 64)).shape == (1, 64, 64)


def test_boundary_values_are_accepted_and_run(small_clip):
    """The largest accepted values build a model that runs (the bounds are not tighter than needed)."""
    model = AnomalyCLIP(
        **{
            **small_clip,
            "feature_layers": (8, 1),
            "dpam_layers": SMALL_DEPTH,
            "n_ctx": 72,
            "text_depth": 12,
            "text_n_ctx": 76,
            "sigma": 0.0,
            "learning_rate": 1e-6,
            "betas": (0.0, 0.5),
            "max_epochs": 1,
        }
    )
    assert list(model.hparams["betas"]) == [0.0, 0.5]
    assert model.model.abnormal_template.length == 77  # SOT, 72 context words, "damaged object.", EOT
    with torch.no_grad():
        output = model.model.eval()(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(output.anomaly_map).all()
    assert output.anomaly_map.shape == (1, 224, 224)
    faprompt = FAPrompt(
        **{**small_clip, "image_size": 112},  # an 8 x 8 grid: every patch goes to the prior network
        n_ctx_normal=70,
        n_ctx_abnormal=2,
        n_abnormal_prompts=1,
        n_prior_patches=64,
        sigma=28.0,
    )
    with torch.no_grad():
        output = faprompt.model.eval()(torch.randn(1, 3, 112, 112))
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()  # smoothed with the widest kernel the map allows
    assert faprompt.model.abnormal_template.length == 77


def test_sigma_zero_disables_smoothing():
    maps = torch.rand(2, 16, 16)
    assert torch.equal(GaussianSmoothing(0.0)(maps), maps)
