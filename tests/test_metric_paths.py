"""One number per metric, whatever the path: ``Engine.test``, ``anomalib test`` through ``AuxiliaryDataModule`` and
the ``zero_shot`` table report the same image AUROC/AP, pixel AUROC and AUPRO for the same prompts and data, and
they equal scikit-learn and an independent per-region-overlap computation on the raw outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anomalib.cli import AnomalibCLI
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.components.metrics import PAPER_METRICS, RawOutputEvaluator
from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.pipelines import ZeroShot

METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}
AUXILIARY, TARGET = "stripes", "disc"


def per_region_overlap_auc(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO as MVTec AD's evaluation code defines it, written independently of anomalib.

    Regions are the 8-connected components of each ground-truth mask. At a threshold t the false positive rate is
    the share of normal pixels scoring >= t over the whole set, the per-region overlap the mean over regions of the
    share of the region's pixels scoring >= t. The curve is integrated (trapezoids) from FPR 0 to ``fpr_limit``,
    interpolating at the limit, and divided by ``fpr_limit``.
    """
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for index, mask in enumerate(masks):
        labels, found = ndimage.label(mask, structure=np.ones((3, 3)))
        regions[index] = np.where(labels > 0, labels + count, 0)
        count += found
    scores, regions = maps.ravel().astype(np.float64), regions.ravel()
    sizes = np.bincount(regions, minlength=count + 1).astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, regions = scores[order], regions[order]
    normal = (regions == 0).astype(np.float64)
    overlap = np.where(regions > 0, 1.0 / sizes[regions], 0.0) / count
    fpr, pro = np.cumsum(normal) / normal.sum(), np.cumsum(overlap)
    last_of_ties = np.append(scores[1:] != scores[:-1], True)  # one curve point per distinct threshold
    fpr, pro = np.concatenate([[0.0], fpr[last_of_ties]]), np.concatenate([[0.0], pro[last_of_ties]])
    beyond = int(np.searchsorted(fpr, fpr_limit, side="right"))  # first point past the limit
    if beyond < len(fpr):
        f1, f2, p1, p2 = fpr[beyond - 1], fpr[beyond], pro[beyond - 1], pro[beyond]
        fpr = np.append(fpr[:beyond], fpr_limit)
        pro = np.append(pro[:beyond], p1 + (p2 - p1) * (fpr_limit - f1) / (f2 - f1))
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def test_independent_aupro_on_a_case_computed_by_hand():
    # One region of 2 pixels and 6 normal pixels. In score order: region, 3 normals, region, 3 normals, so the curve
    # goes (0, 0) -> (0, .5) -> (1/6, .5) -> (2/6, .5) -> (3/6, .5) -> (3/6, 1) -> (4/6, 1) -> ...
    maps = np.array([[[0.9, 0.5, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3]]])
    masks = np.array([[[1, 1, 0, 0, 0, 0, 0, 0]]])
    assert per_region_overlap_auc(maps, masks, fpr_limit=0.3) == pytest.approx(0.5 * 0.3 / 0.3)
    assert per_region_overlap_auc(maps, masks, fpr_limit=0.7) == pytest.approx(
        (0.5 * 3 / 6 + 1.0 * (0.7 - 3 / 6)) / 0.7
    )


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paths")
    return generate_synthetic_dataset(root, categories=[AUXILIARY, TARGET], n_train=2, n_test=6, image_size=64)


def make_settings(method: str, small_clip: dict, prompts: Path) -> dict:
    extra = {"feature_layers": [2, 4, 6, 8]} if method == "AnomalyCLIP" else {}
    return {**small_clip, **extra, "prompt_weights": str(prompts)}


def target_datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category=TARGET, eval_batch_size=4, num_workers=0)


def reference_metrics(method: str, settings: dict, root: Path, tmp_path: Path) -> dict[str, float]:
    """The four metrics from the raw outputs, with scikit-learn and the independent AUPRO."""
    model = METHODS[method](**settings, post_processor=False, visualizer=False)
    engine = Engine(default_root_dir=tmp_path / "reference", accelerator="cpu", logger=False)
    batches = engine.predict(model, datamodule=target_datamodule(root))
    scores = torch.cat([batch.pred_score for batch in batches]).numpy()
    labels = torch.cat([batch.gt_label for batch in batches]).numpy()
    maps = torch.cat([batch.anomaly_map for batch in batches]).numpy()
    masks = torch.cat([batch.gt_mask for batch in batches]).numpy().astype(np.uint8)
    assert 0 < labels.sum() < len(labels), "the target's test split must hold normal and anomalous images"
    return {
        "image_AUROC": roc_auc_score(labels, scores),
        "image_AP": average_precision_score(labels, scores),
        "pixel_AUROC": roc_auc_score(masks.ravel(), maps.ravel()),
        "pixel_AUPRO": per_region_overlap_auc(maps, masks),
    }


def engine_test(method: str, settings: dict, root: Path, tmp_path: Path) -> dict[str, float]:
    model = METHODS[method](**settings)
    engine = Engine(default_root_dir=tmp_path / "engine", accelerator="cpu", logger=False)
    return engine.test(model, datamodule=target_datamodule(root), verbose=False)[0]


def cli_test(method: str, settings: dict, root: Path, tmp_path: Path) -> dict[str, float]:
    """``anomalib test --config`` with ``AuxiliaryDataModule``, parsed and run by anomalib's CLI in-process."""
    dataset = {"root": str(root), "eval_batch_size": 4, "num_workers": 0}
    config = {
        "model": {"class_path": method, "init_args": settings},
        "data": {
            "class_path": "anomalib_faprompt.data.AuxiliaryDataModule",
            "init_args": {
                "auxiliary": [{"class_path": "anomalib.data.MVTecAD", "init_args": {**dataset, "category": AUXILIARY}}],
                "target": {"class_path": "anomalib.data.MVTecAD", "init_args": {**dataset, "category": TARGET}},
                "eval_batch_size": 4,
                "num_workers": 0,
            },
        },
        "trainer": {"accelerator": "cpu", "logger": False},
        "default_root_dir": str(tmp_path / "cli"),
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = AnomalibCLI(["test", "--config", str(path)])
    return {name: float(value) for name, value in cli.engine.trainer.callback_metrics.items()}


def zero_shot_table(method: str, settings: dict, root: Path, tmp_path: Path) -> dict[str, float]:
    dataset = {"class_path": "MVTecAD", "init_args": {"root": str(root)}}
    config = {
        "seed": 0,
        "accelerator": "cpu",
        "eval_batch_size": 4,
        "num_workers": 0,
        "results_dir": str(tmp_path / "zero_shot"),
        "auxiliary": {"dataset": dataset, "categories": [AUXILIARY]},
        "targets": [{"dataset": dataset, "categories": [TARGET]}],
        "models": [{"class_path": method, "init_args": settings}],
    }
    table = ZeroShot().run_config(config)
    row = table[table.category == TARGET]
    assert len(row) == 1, table
    return row.iloc[0].to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_path_reports_the_same_metrics(method, small_clip, released_prompts, synthetic_root, tmp_path):
    settings = make_settings(method, small_clip, released_prompts[method])
    expected = reference_metrics(method, settings, synthetic_root, tmp_path)
    paths = {
        "Engine.test": engine_test(method, settings, synthetic_root, tmp_path),
        "anomalib test (AuxiliaryDataModule)": cli_test(method, settings, synthetic_root, tmp_path),
        "zero_shot table": zero_shot_table(method, settings, synthetic_root, tmp_path),
    }
    for path, metrics in paths.items():
        for name in PAPER_METRICS:
            assert float(metrics[name]) == pytest.approx(expected[name], abs=1e-6), (path, name, metrics, expected)


def test_default_evaluator_scores_raw_outputs_before_post_processing(small_clip, released_prompts):
    """The evaluator's threshold-free metrics come before the post-processor, which clamps to [0, 1]."""
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])
    assert isinstance(model.evaluator, RawOutputEvaluator)
    callbacks = model.configure_callbacks()
    raw_update = callbacks.index(model.evaluator.before_post_processing)
    assert raw_update < callbacks.index(model.post_processor) < callbacks.index(model.evaluator)


def test_an_evaluator_given_by_the_user_also_scores_raw_outputs(small_clip, released_prompts, tiny_mvtec, tmp_path):
    """A plain anomalib ``Evaluator`` (AUROC on scores, F1 on labels) gets the same treatment."""
    from anomalib.metrics import AUROC, Evaluator, F1Score

    evaluator = Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"]),
        ]
    )
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"], evaluator=evaluator)
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", eval_batch_size=3, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    raw = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"], post_processor=False, visualizer=False)
    batches = engine.predict(raw, datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in batches]).numpy()
    labels = torch.cat([batch.gt_label for batch in batches]).numpy()
    assert metrics["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert "F1Score" in metrics


def test_paper_metric_names_match_the_table_columns():
    from anomalib_faprompt.pipelines.zero_shot import METRICS

    assert tuple(METRICS) == PAPER_METRICS
