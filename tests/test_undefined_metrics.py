"""A metric that is undefined on the test data is NaN with a notice naming it, never 0.0, on every path.

AUROC, AP and AUPRO rank anomalous against normal samples; with only normal (or only anomalous) test images, a
single image, or masks without an anomalous pixel they are undefined, and torchmetrics returns 0.0 for them.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, F1Score
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalib_faprompt import FAPrompt
from anomalib_faprompt.components.metrics import AP, undefined_reason

PAPER_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO")


def one_kind(tiny_mvtec: Path, destination: Path, keep: str) -> Path:
    """A copy of the tiny dataset whose test split holds only normal (``keep="good"``) or only anomalous images."""
    root = destination / f"only_{keep}"
    shutil.copytree(tiny_mvtec, root)
    drop = "spot" if keep == "good" else "good"
    shutil.rmtree(root / "widget" / "test" / drop)
    if keep == "good":
        shutil.rmtree(root / "widget" / "ground_truth")
    return root


@pytest.fixture(scope="module")
def zero_shot_model(small_clip, released_prompts) -> FAPrompt:
    return FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])


def test_a_test_split_of_only_normal_images_gives_nan_and_a_notice(zero_shot_model, tiny_mvtec, tmp_path, caplog):
    root = one_kind(tiny_mvtec, tmp_path, keep="good")
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    with caplog.at_level(logging.WARNING):
        [results] = engine.test(zero_shot_model, datamodule=MVTecAD(root=root, category="widget", num_workers=0))
    for name in (*PAPER_METRICS, "image_F1Score"):
        assert math.isnan(results[name]), (name, results[name])
    assert ("image_AUROC is undefined on MVTecAD/widget (test split): its 3 images are all normal, and image_AUROC "
            "needs normal and anomalous ones. Reported as NaN") in caplog.text  # fmt: skip
    assert "pixel_AUPRO is undefined on MVTecAD/widget (test split): its 150528 pixels are all normal" in caplog.text


def test_a_test_split_of_only_anomalous_images_keeps_its_pixel_metrics(zero_shot_model, tiny_mvtec, tmp_path,
                                                                       caplog):  # fmt: skip
    root = one_kind(tiny_mvtec, tmp_path, keep="spot")
    datamodule = MVTecAD(root=root, category="widget", num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    with caplog.at_level(logging.WARNING):
        [results] = engine.test(zero_shot_model, datamodule=datamodule)
    assert math.isnan(results["image_AUROC"]) and math.isnan(results["image_AP"])
    assert "image_AP is undefined on MVTecAD/widget (test split): its 3 images are all anomalous" in caplog.text
    # The masks hold normal and anomalous pixels: pixel AUROC is defined, and equals scikit-learn's.
    raw = FAPrompt(**zero_shot_model.hparams | {"post_processor": False, "visualizer": False})
    batches = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False).predict(raw, datamodule=datamodule)
    maps = torch.cat([batch.anomaly_map for batch in batches]).flatten().numpy()
    masks = torch.cat([batch.gt_mask for batch in batches]).flatten().numpy()
    assert results["pixel_AUROC"] == pytest.approx(roc_auc_score(masks, maps), abs=1e-6)
    assert not math.isnan(results["pixel_AUPRO"])


def test_anomalib_test_prints_nan_for_an_undefined_metric(small_clip, released_prompts, tiny_mvtec, tmp_path, capsys,
                                                          caplog):  # fmt: skip
    from anomalib.cli.cli import AnomalibCLI

    root = one_kind(tiny_mvtec, tmp_path, keep="good")
    model = ["--model", "FAPrompt", *(f"--model.{key}={value}" for key, value in small_clip.items())]
    arguments = ["test", *model, "--model.prompt_weights", str(released_prompts["FAPrompt"]), "--data", "MVTecAD",
                 "--data.root", str(root), "--data.category", "widget", "--data.num_workers", "0",
                 "--default_root_dir", str(tmp_path / "results"), "--trainer.logger", "false"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        AnomalibCLI(arguments)
    printed = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in printed.splitlines() if "│" in line}
    assert {name: rows[name] for name in PAPER_METRICS} == dict.fromkeys(PAPER_METRICS, "nan")
    assert "image_AUROC is undefined on MVTecAD/widget (test split)" in caplog.text


def batch(scores: list[float], labels: list[int]) -> ImageBatch:
    count = len(scores)
    return ImageBatch(image=torch.zeros(count, 3, 4, 4), pred_score=torch.tensor(scores),
                      gt_label=torch.tensor(labels), pred_label=torch.tensor(scores) > 0.5)  # fmt: skip


@pytest.mark.parametrize(
    ("scores", "labels", "undefined"),
    [
        ([0.2], [0], "its 1 images are all normal"),
        ([0.9], [1], "its 1 images are all anomalous"),
        ([0.2, 0.7, 0.4], [0, 0, 0], "its 3 images are all normal"),
        ([0.2, 0.7, 0.4], [0, 1, 1], None),
    ],
)
def test_ranking_metrics_need_both_kinds_and_f1_needs_anomalies(scores, labels, undefined):
    for metric in (AUROC(fields=["pred_score", "gt_label"]), AP(fields=["pred_score", "gt_label"])):
        metric.update(batch(scores, labels))
        reason = undefined_reason(metric)
        assert reason == (None if undefined is None else f"{undefined}, and {metric.name} needs normal and anomalous "
                                                        "ones")  # fmt: skip
        if undefined is None:  # defined: the value is scikit-learn's
            reference = roc_auc_score if isinstance(metric, AUROC) else average_precision_score
            assert float(metric.compute()) == pytest.approx(reference(labels, scores), abs=1e-6)
    f1 = F1Score(fields=["pred_label", "gt_label"])
    f1.update(batch(scores, labels))
    assert (undefined_reason(f1) is None) == any(labels)


def test_pixel_metrics_count_pixels():
    maps = torch.rand(2, 8, 8)
    for masks, defined in ((torch.zeros(2, 8, 8), False), ((torch.rand(2, 8, 8) > 0.7), True)):
        item = ImageBatch(image=torch.zeros(2, 3, 8, 8), anomaly_map=maps, gt_mask=masks.bool(),
                          gt_label=masks.flatten(1).any(dim=1).long())  # fmt: skip
        metric = AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
        metric.update(item)
        reason = undefined_reason(metric)
        assert (reason is None) == defined
        if not defined:
            assert reason == f"its {np.prod(masks.shape)} pixels are all normal, and pixel_AUPRO needs normal and " \
                             "anomalous ones"  # fmt: skip
