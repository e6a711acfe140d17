"""The zero-shot protocol: ``anomalib zero_shot`` on synthetic categories with the small CLIP."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from anomalib.data import ImageItem, MVTecAD
from anomalib.engine import Engine
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalib_faprompt import AnomalyCLIP, FAPrompt
from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.pipelines import ZeroShot
from test_metric_paths import per_region_overlap_auc

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
AUXILIARY, HELD_OUT = ["stripes", "checker", "grain"], ["disc", "plate"]


def protocol(root: Path, results: Path, small_clip: dict, models: list[str], max_epochs: int = 5,
             dataset: dict | None = None) -> dict:  # fmt: skip
    dataset = dataset or {"class_path": "MVTecAD", "init_args": {"root": str(root)}}
    settings = {
        "AnomalyCLIP": {**small_clip, "feature_layers": [2, 4, 6, 8]},
        "FAPrompt": small_clip,
        "Patchcore": {"backbone": "resnet18", "pre_trained": False, "layers": ["layer2", "layer3"]},
    }
    return {
        "seed": 0,
        "accelerator": "cpu",
        "max_epochs": max_epochs,
        "num_workers": 0,
        "results_dir": str(results),
        "auxiliary": {"dataset": dataset, "categories": AUXILIARY},
        "targets": [{"dataset": dataset, "categories": HELD_OUT}],
        "models": [{"class_path": name, "init_args": settings[name]} for name in models],
    }


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=4, n_test=8, image_size=128)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, synthetic_root, small_clip):
    """``anomalib zero_shot --config ...`` in a fresh process: both methods and PatchCore."""
    folder = tmp_path_factory.mktemp("zero_shot")
    config = folder / "protocol.yaml"
    config.write_text(yaml.safe_dump(protocol(synthetic_root, folder / "results", small_clip,
                                              ["AnomalyCLIP", "FAPrompt", "Patchcore"])))  # fmt: skip
    result = subprocess.run([ANOMALIB, "zero_shot", "--config", str(config)], capture_output=True, text=True,
                            timeout=1200, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "results", result


@pytest.mark.slow
def test_cli_writes_the_table_with_one_row_per_model_and_category(cli_run):
    results, result = cli_run
    table = pd.read_csv(results / "results.csv")
    for model in ("AnomalyCLIP", "FAPrompt", "Patchcore"):
        rows = table[table.model == model]
        assert sorted(rows.category) == sorted([*HELD_OUT, "mean"])
        per_category = rows[rows.category != "mean"]
        mean = rows[rows.category == "mean"].iloc[0]
        for metric in ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO"):
            assert per_category[metric].between(0, 1).all()
            assert mean[metric] == pytest.approx(per_category[metric].mean())
    markdown = (results / "results.md").read_text().splitlines()
    assert all(line.startswith("|") for line in markdown[: len(table) + 2])  # header, separator, one line a row
    assert markdown[len(table) + 2 :] == [  # the random small CLIP and PatchCore's random backbone, named
        "",
        "Untrained weights: these models' numbers show the pipeline working, not the methods' accuracy.",
        "- AnomalyCLIP: the random small CLIP of shared/golden (clip_small_seed0.pt)",
        "- FAPrompt: the random small CLIP of shared/golden (clip_small_seed0.pt)",
        "- Patchcore: a backbone with random weights (pre_trained=False)",
    ]
    assert (results / "results.png").stat().st_size > 10_000
    assert "| FAPrompt | mean | mean |" in result.stdout
    assert len(list(results.glob("FAPrompt/*/prompts.pt"))) == 1  # <model>/<settings fingerprint>/prompts.pt


@pytest.mark.slow
@pytest.mark.parametrize("method", [AnomalyCLIP, FAPrompt])
def test_table_equals_scikit_learn_on_raw_outputs(cli_run, method, small_clip, synthetic_root, tmp_path):
    results, _ = cli_run
    table = pd.read_csv(results / "results.csv")
    extra = {"feature_layers": (2, 4, 6, 8)} if method is AnomalyCLIP else {}
    [prompts] = results.glob(f"{method.__name__}/*/prompts.pt")
    for category in HELD_OUT:
        model = method(**small_clip, **extra, prompt_weights=prompts, post_processor=False, visualizer=False)
        datamodule = MVTecAD(root=synthetic_root, category=category, eval_batch_size=8, num_workers=0)
        batches = Engine(default_root_dir=tmp_path, accelerator="cpu").predict(model, datamodule=datamodule)
        scores = torch.cat([batch.pred_score for batch in batches]).numpy()
        labels = torch.cat([batch.gt_label for batch in batches]).numpy()
        maps = torch.cat([batch.anomaly_map for batch in batches]).numpy()
        masks = torch.cat([batch.gt_mask for batch in batches]).numpy()
        row = table[(table.model == method.__name__) & (table.category == category)].iloc[0]
        assert row.image_AUROC == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert row.image_AP == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
        assert row.pixel_AUROC == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
        assert row.pixel_AUPRO == pytest.approx(per_region_overlap_auc(maps, masks), abs=1e-6)
        # The random small CLIP's maps often rank defects *below* most normal pixels (pixel AUROC < 0.5); AUPRO, which
        # only counts thresholds up to 30 % FPR, is then 0. That 0 is right when no defect pixel scores as high as the
        # normal pixel that takes the false positive rate past 30 %, and only then.
        normal = np.sort(maps[~masks])[::-1]
        threshold_at_limit = normal[int(0.3 * normal.size)]
        flagged_defect_pixels = int((maps[masks] >= threshold_at_limit).sum())
        assert (row.pixel_AUPRO == 0) == (flagged_defect_pixels == 0), (row.pixel_AUPRO, flagged_defect_pixels)


@pytest.mark.slow
def test_a_run_resumes_without_retraining(cli_run, small_clip, synthetic_root):
    results, _ = cli_run
    config = protocol(synthetic_root, results, small_clip, ["FAPrompt"])
    [prompts] = results.glob("FAPrompt/*/prompts.pt")
    rows = sorted(prompts.parent.glob("rows/*.json"))
    assert len(rows) == len(HELD_OUT)
    before = [path.stat().st_mtime_ns for path in [prompts, *rows]]
    previous = pd.read_csv(results / "results.csv")  # the CLI run's table, before the rerun rewrites it
    table = ZeroShot().run_config(config)
    assert [path.stat().st_mtime_ns for path in [prompts, *rows]] == before
    assert table.set_index(["model", "category"]).image_AUROC.to_dict() == pytest.approx(
        previous[previous.model == "FAPrompt"].set_index(["model", "category"]).image_AUROC.to_dict()
    )


def test_target_missing_on_disk(tmp_path, small_clip, synthetic_root):
    config = protocol(synthetic_root, tmp_path, small_clip, ["FAPrompt"])
    config["targets"] = [{"dataset": {"class_path": "Visa", "init_args": {"root": str(tmp_path / "VisA")}},
                          "categories": ["pcb1"]}]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"Visa: categories \['pcb1'\] not found under"):
        ZeroShot().run_config(config)


def test_unknown_category(tmp_path, small_clip, synthetic_root):
    config = protocol(synthetic_root, tmp_path, small_clip, ["FAPrompt"])
    config["targets"][0]["categories"] = ["disc", "marble"]
    with pytest.raises(ValueError, match=r"MVTecAD: unknown categories \['marble'\]; available:"):
        ZeroShot().run_config(config)


# Heat-maps and untrained-weights notices (no run needed) -------------------------------------------------------------


def heat_map_item(present: tuple[str, ...]) -> ImageItem:
    """A 64 px item with an anomaly map and, if in ``present``, a ground truth and a (different) predicted mask."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 20:44] = True
    return ImageItem(
        image=torch.rand(3, 64, 64, generator=generator),
        anomaly_map=torch.rand(64, 64, generator=generator),
        gt_mask=mask if "gt_mask" in present else None,
        pred_mask=mask.roll(8, dims=1) if "pred_mask" in present else None,
    )


@pytest.mark.parametrize(
    ("present", "titles"),
    [
        (("gt_mask", "pred_mask"), ["Image", "Gt Mask", "Pred Mask", "Image + Anomaly Map"]),
        (("gt_mask",), ["Image", "Gt Mask", "Image + Anomaly Map"]),  # no post-processor: no predicted mask
        ((), ["Image", "Image + Anomaly Map"]),  # predict on images without masks
    ],
)
@pytest.mark.parametrize("method", [AnomalyCLIP, FAPrompt])
def test_heat_map_panels_are_titled_and_none_repeats_another(method, present, titles):
    item = heat_map_item(present)
    drawn = method.configure_visualizer().visualize(item)
    assert drawn.size == (256 * len(titles), 256)
    untitled = method.configure_visualizer()
    untitled.text_config["enable"] = False  # compare the panels' content, not their titles
    plain = np.asarray(untitled.visualize(item))
    panels = [plain[:, 256 * index : 256 * (index + 1)] for index in range(len(titles))]
    for first, second in itertools.combinations(range(len(titles)), 2):
        assert not np.array_equal(panels[first], panels[second]), (titles[first], titles[second])
    assert method.configure_visualizer().panel_titles(item) == titles


@pytest.mark.parametrize("field_size", [(256, 256), (128, 128)])
def test_heat_map_titles_end_inside_their_panel(field_size):
    """No title runs past its panel's right edge (anomalib's 256 px default cut "Image + Anomaly Map" to "...Ma").

    Every panel is one flat colour (white image, white masks, a constant anomaly map); a title darkens the band at
    the top of its panel with its background box. The last columns of that band must keep the panel's colour.
    """
    from anomalib_faprompt.visualization import HeatMapVisualizer

    height, width = field_size[1], field_size[0]
    ones = torch.ones(64, 64, dtype=torch.bool)
    item = ImageItem(image=torch.ones(3, 64, 64), anomaly_map=torch.full((64, 64), 0.5), gt_mask=ones, pred_mask=ones)
    visualizer = HeatMapVisualizer(field_size=field_size)
    drawn = np.asarray(visualizer.visualize(item)).astype(int)
    untitled = HeatMapVisualizer(field_size=field_size)
    untitled.text_config["enable"] = False
    plain = np.asarray(untitled.visualize(item)).astype(int)
    titles = visualizer.panel_titles(item)
    assert drawn.shape == (height, width * len(titles), 3)
    for index, title in enumerate(titles):
        panel, flat = drawn[:, width * index : width * (index + 1)], plain[:, width * index : width * (index + 1)]
        assert (panel[: height // 4] != flat[: height // 4]).any(), f"{title!r} is not drawn"
        edge = slice(width - 4, width)
        assert np.array_equal(panel[: height // 4, edge], flat[: height // 4, edge]), f"{title!r} reaches the edge"


def test_a_notice_strip_goes_below_the_panels():
    from anomalib_faprompt.visualization import NOTICE_HEIGHT, HeatMapVisualizer

    item = heat_map_item(("gt_mask", "pred_mask"))
    without = np.asarray(HeatMapVisualizer().visualize(item))
    noticed = np.asarray(HeatMapVisualizer(notice="untrained weights").visualize(item))
    assert noticed.shape == (256 + NOTICE_HEIGHT, 4 * 256, 3)
    assert np.array_equal(noticed[:256], without)
    assert noticed[256:].any()  # the text


def test_the_random_small_clip_is_recognised_by_its_content_not_its_path(small_clip, tmp_path):
    from anomalib.models import Patchcore

    from anomalib_faprompt.visualization import untrained_weights_notice

    golden = "the random small CLIP of shared/golden (clip_small_seed0.pt)"
    assert untrained_weights_notice(FAPrompt(**small_clip)) == golden
    renamed = tmp_path / "my_clip.pt"
    shutil.copy(small_clip["pretrained"], renamed)
    assert untrained_weights_notice(AnomalyCLIP(**{**small_clip, "pretrained": str(renamed)})) == golden
    other = torch.load(small_clip["pretrained"], map_location="cpu", weights_only=True)
    other["logit_scale"] = other["logit_scale"] + 2  # any other weights of this architecture, trained or not
    torch.save(other, tmp_path / "other.pt")
    assert untrained_weights_notice(FAPrompt(**{**small_clip, "pretrained": str(tmp_path / "other.pt")})) is None
    random_init = untrained_weights_notice(FAPrompt(**{**small_clip, "pretrained": None}))
    assert random_init == "a CLIP with randomly initialised weights (pretrained=None)"
    baseline = Patchcore(backbone="resnet18", pre_trained=False, layers=["layer2", "layer3"])
    assert untrained_weights_notice(baseline) == "a backbone with random weights (pre_trained=False)"
