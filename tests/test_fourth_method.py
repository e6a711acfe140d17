"""A fourth method, written here and nowhere else, runs every path the built-in methods run.

``FixedPrompts`` scores with two hand-written prompts ("a photo of a flawless object." / "a photo of a damaged
object.") on the shared DPAM path, with nothing to learn. It is its torch model (what differs: the prompts and the
scoring), its Lightning class (its settings, identity and rule) and one call of the public extension point,
``register_method``. With that alone it runs through ``Engine.test``, ``anomalib test --model FixedPrompts``, export to
ONNX and ``anomalib zero_shot`` as a model of the table; every path gives the same numbers, checked against
scikit-learn and against open_clip's own text encoder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from anomalib.models.components import AnomalibModule

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.components.similarity import patch_similarity, similarity_logits, upsample_maps
from anomalib_faprompt.methods import METHODS, Learning, register_method, unregister_method
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.models.training_rules import NoPromptLearning

PROMPTS = ("a photo of a flawless object.", "a photo of a damaged object.")
PAPER_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO")


@dataclasses.dataclass
class FixedPromptsOutput:
    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_features: list[torch.Tensor] | None = None


class FixedPromptsModel(PromptedCLIP):
    """A frozen DPAM CLIP scored against two fixed prompts: no context, no deep prompts, nothing learned."""

    def __init__(self, backbone: str, pretrained: str | None, image_size: int, dpam_layers: int, sigma: float) -> None:
        super().__init__(backbone, pretrained, image_size, dpam_layers, text_depth=1, text_n_ctx=1, sigma=sigma)
        self.prompts = self.text.template(list(PROMPTS), n_ctx=0)

    def encode_static_text(self) -> torch.Tensor:
        (features,) = self.encode_prompts((self.prompts, torch.empty(len(PROMPTS), 0, self.text.width)))
        return F.normalize(features, dim=-1)

    def score_features(self, image_size, text, image_features, patch_features) -> FixedPromptsOutput:
        score = similarity_logits(image_features, text, self.temperature).softmax(dim=-1)[:, 1]
        maps = [upsample_maps(patch_similarity(features, text, self.temperature), image_size)[:, 1]
                for features in patch_features]  # fmt: skip
        return FixedPromptsOutput(score, torch.stack(maps).sum(dim=0))


class FixedPrompts(PromptMethod, AnomalibModule):
    """Zero-shot anomaly detection with two hand-written prompts.

    Args:
        dpam_layers: Final vision blocks running DPAM's V-V path.
        sigma: Gaussian smoothing of the map in pixels.
        kwargs: The settings of every prompt method (``backbone``, ``pretrained``, ``image_size``, ...).
    """

    method_name = "FixedPrompts"
    learning_types: ClassVar[tuple[Learning, ...]] = (Learning.ZERO_SHOT,)
    training_rule = NoPromptLearning()

    def __init__(self, dpam_layers: int = 19, sigma: float = 4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def build_model(self) -> FixedPromptsModel:
        names = ("backbone", "pretrained", "image_size", "dpam_layers", "sigma")
        return FixedPromptsModel(**{name: self.hparams[name] for name in names})


@pytest.fixture(scope="module")
def registered():
    """The method registered through the public extension point for this module's tests, then withdrawn."""
    import anomalib.models

    assert "FixedPrompts" not in METHODS and not hasattr(anomalib.models, "FixedPrompts")
    entry = register_method(FixedPrompts)
    yield entry
    unregister_method("FixedPrompts")
    assert "FixedPrompts" not in METHODS and not hasattr(anomalib.models, "FixedPrompts")


@pytest.fixture(scope="module")
def settings(small_clip) -> dict[str, Any]:
    return {key: small_clip[key] for key in ("backbone", "pretrained", "image_size", "dpam_layers")}


@pytest.fixture(scope="module")
def engine_metrics(registered, settings, tiny_mvtec, tmp_path_factory) -> dict[str, float]:
    """``Engine.test`` of the method on the tiny MVTec-layout category, by its short name."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import get_model

    del registered
    model = get_model("FixedPrompts", **settings)
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("engine"), accelerator="cpu", logger=False)
    return {name: float(value) for name, value in engine.test(model, datamodule=datamodule, verbose=False)[0].items()}


def test_its_registration_comes_only_from_the_extension_point(registered):
    import anomalib.models

    from anomalib_faprompt.methods import BUILT_IN_METHODS

    assert registered.lightning_class is FixedPrompts and registered.prompt_identity == "FixedPrompts"
    assert METHODS["FixedPrompts"] is registered and anomalib.models.FixedPrompts is FixedPrompts
    assert "FixedPrompts" not in BUILT_IN_METHODS
    source = Path(__file__).resolve().parents[1] / "src"
    assert not [path for path in source.rglob("*") if path.is_file() and b"FixedPrompts" in path.read_bytes()]
    assert register_method(FixedPrompts) is registered  # again: nothing changes


def test_the_extension_point_refuses_what_anomalib_could_not_resolve(registered):
    class Patchcore(FixedPrompts, AnomalibModule):
        method_name = "OtherIdentity"

    with pytest.raises(ValueError, match=r"anomalib\.models already has a model of that name"):
        register_method(Patchcore)
    with pytest.raises(ValueError, match="prompt identity is that of the registered method FixedPrompts"):
        register_method(type("Renamed", (FixedPrompts, AnomalibModule), {"method_name": "FixedPrompts"}))
    with pytest.raises(TypeError, match="takes a prompt method's Lightning class"):
        register_method(dict)
    with pytest.raises(ValueError, match="not a method registered with register_method"):
        unregister_method("FAPrompt")
    assert "Patchcore" not in METHODS and "Renamed" not in METHODS


def test_the_shared_text_path_encodes_its_prompts_as_open_clip_does(registered, settings):
    from anomalib_faprompt.clip.loading import build_clip, build_tokenizer

    model = FixedPrompts(**settings).model.eval()
    clip = build_clip(settings["backbone"], settings["pretrained"]).eval()
    tokens = build_tokenizer(settings["backbone"], clip.positional_embedding.shape[0])(list(PROMPTS))
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.encode_static_text(), expected, atol=1e-5, rtol=1e-5)


def test_engine_test_gives_the_metrics_of_its_own_scores(registered, settings, engine_metrics, tiny_mvtec):
    from PIL import Image
    from sklearn.metrics import average_precision_score, roc_auc_score

    model = FixedPrompts(**settings).eval()
    paths = sorted((tiny_mvtec / "widget" / "test").rglob("*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for path in paths])  # fmt: skip
    with torch.no_grad():
        scores = model.model(model.pre_processor(images)).pred_score.numpy()
    labels = [path.parent.name != "good" for path in paths]
    assert engine_metrics["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert engine_metrics["image_AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


def test_anomalib_test_with_its_short_name_gives_the_engines_metrics(
    registered, settings, engine_metrics, tiny_mvtec, tmp_path
):
    from anomalib.cli.cli import AnomalibCLI

    model = ["--model", "FixedPrompts", *(f"--model.{key}={value}" for key, value in settings.items())]
    data = ["--data", "MVTecAD", "--data.root", str(tiny_mvtec), "--data.category", "widget"]
    data += ["--data.num_workers", "0", "--data.eval_batch_size", "4"]
    cli = AnomalibCLI(["test", *model, *data, "--default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert type(cli.model) is FixedPrompts
    metrics = {name: float(value) for name, value in cli.engine.trainer.callback_metrics.items()}
    for name in PAPER_METRICS:
        assert metrics[name] == pytest.approx(engine_metrics[name], abs=1e-6), name


def test_its_onnx_export_scores_as_the_torch_model(registered, settings, tmp_path):
    import onnxruntime

    model = FixedPrompts(**settings).eval()
    onnx_path = model.to_onnx(tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 300, 260, generator=torch.Generator().manual_seed(0))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    with torch.no_grad():
        expected = model(images)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"].reshape(expected.anomaly_map.shape),
                               expected.anomaly_map.numpy(), atol=1e-4)  # fmt: skip


def test_anomalib_zero_shot_puts_it_in_the_table_with_the_engines_numbers(
    registered, settings, engine_metrics, tiny_mvtec, tmp_path
):
    from anomalib.cli.cli import AnomalibCLI

    dataset = {"class_path": "MVTecAD", "init_args": {"root": str(tiny_mvtec)}}
    config = {
        "accelerator": "cpu",
        "num_workers": 0,
        "results_dir": str(tmp_path / "results"),
        "auxiliary": {"dataset": dataset, "categories": ["widget"]},
        "targets": [{"dataset": dataset, "categories": ["widget"]}],
        "models": [{"class_path": "FixedPrompts", "init_args": settings}],
    }
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(config))
    AnomalibCLI(["zero_shot", "--config", str(path)])
    table = pd.read_csv(tmp_path / "results" / "results.csv")
    row = table[(table["model"] == "FixedPrompts") & (table["category"] == "widget")]
    assert len(row) == 1
    for name in PAPER_METRICS:
        assert float(row[name].iloc[0]) == pytest.approx(engine_metrics[name], abs=1e-6), name
