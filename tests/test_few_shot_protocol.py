"""The few-shot protocol of ``anomalib zero_shot``: ``k_shot: [0, 1, 2]`` and ``samplings``, mean ± std rows.

Tiny synthetic data (one auxiliary and one target category, 4 normal train images, 64 px), the small CLIP at
112 px, one epoch: FAPrompt's prompts are learned once, then it and PatchCore run k = 0, 1, 2 with 2 samplings.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore
from sklearn.metrics import roc_auc_score

from anomalib_faprompt import FAPrompt
from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.pipelines import ZeroShot
from anomalib_faprompt.pipelines.few_shot import Shot, plan_shots
from anomalib_faprompt.pipelines.few_shot_table import summarise_few_shot
from anomalib_faprompt.pipelines.report import summarise
from test_zero_shot import protocol

METRICS = ["image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO"]
SEED, KS, SAMPLINGS, N_TRAIN = 0, [0, 1, 2], 2, 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("data"), categories=["stripes", "disc"], n_train=N_TRAIN,
                                      n_test=2, image_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_clip(small_clip) -> dict[str, Any]:
    return {**small_clip, "image_size": 112}


def few_shot_config(root: Path, results: Path, tiny_clip: dict, models=("FAPrompt", "Patchcore"), **protocol_settings):
    config = protocol(root, results, tiny_clip, list(models), max_epochs=1)
    config["auxiliary"]["categories"], config["targets"][0]["categories"] = ["stripes"], ["disc"]
    return config | {"k_shot": KS, "samplings": SAMPLINGS} | protocol_settings


@contextmanager
def spying(stages: Collection[str] | None = None) -> Iterator[tuple[list, list]]:
    """The reference files each model takes: the prompt models' memory and PatchCore's fitted images.

    Yields lists filled while the context runs: ``(k, reference seed, files)`` per collection of references (in
    ``stages`` of the trainer, all when ``None``), and the images of each PatchCore fit's training batches.
    """
    memory: list[tuple[int, int, list[str]]] = []
    fitted: list[list[str]] = []
    collect, step, fit = PromptMethod.collect_references, Patchcore.training_step, Engine.fit

    def spy_collect(self):
        shots = collect(self)
        if stages is None or self.trainer.state.fn in stages:
            memory.append((self.k_shot, self.reference_seed, list(self.reference_files)))
        return shots

    def spy_step(self, batch, *args, **kwargs):
        fitted[-1].extend(str(path) for path in batch.image_path)
        return step(self, batch, *args, **kwargs)

    def spy_fit(self, model, *args, **kwargs):
        if isinstance(model, Patchcore):
            fitted.append([])
        return fit(self, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PromptMethod, "collect_references", spy_collect)
        patch.setattr(Patchcore, "training_step", spy_step)
        patch.setattr(Engine, "fit", spy_fit)
        yield memory, fitted


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory, root, tiny_clip) -> Iterator[dict[str, Any]]:
    """One run, with the reference files each model took: the prompt model's memory, PatchCore's fitted images."""
    results = tmp_path_factory.mktemp("few_shot") / "results"
    with spying() as (memory, fitted):
        table = ZeroShot().run_config(few_shot_config(root, results, tiny_clip))
    yield {"results": results, "table": table, "memory": memory, "fitted": fitted}


def row_files(results: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in results.rglob("rows/*.json")}


def raw_outputs(model: FAPrompt, root: Path, tmp_path: Path) -> tuple[np.ndarray, ...]:
    datamodule = MVTecAD(root=root, category="disc", num_workers=0, eval_batch_size=8)
    batches = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False).predict(model, datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in batches]).numpy()
    labels = torch.cat([batch.gt_label for batch in batches]).numpy()
    maps = torch.cat([batch.anomaly_map for batch in batches]).flatten().numpy()
    masks = torch.cat([batch.gt_mask for batch in batches]).flatten().numpy()
    return labels, scores, masks, maps


def test_rows_are_the_mean_and_std_over_samplings_of_an_independent_auroc(spied_run, root, tiny_clip, tmp_path):
    table = spied_run["table"]
    assert list(table.columns[:5]) == ["model", "dataset", "category", "k", "samplings"]
    assert {"image_AUROC_std", "pixel_AUROC_std"} <= set(table.columns)
    [prompts] = spied_run["results"].glob("FAPrompt/*/prompts.pt")
    rows = table[(table.model == "FAPrompt") & (table.category == "disc")].set_index("k")
    assert list(rows.index) == KS
    assert rows.loc[0, "samplings"] == 1 and np.isnan(rows.loc[0, "image_AUROC_std"])
    for k in (1, 2):
        image, pixel = [], []
        for sampling in range(SAMPLINGS):  # sampling s draws with reference seed = seed + s
            model = FAPrompt(**tiny_clip, prompt_weights=prompts, k_shot=k, reference_seed=SEED + sampling,
                             post_processor=False, visualizer=False)  # fmt: skip
            labels, scores, masks, maps = raw_outputs(model, root, tmp_path)
            image.append(roc_auc_score(labels, scores))
            pixel.append(roc_auc_score(masks, maps))
        assert rows.loc[k, "samplings"] == SAMPLINGS
        # Population standard deviation (numpy's default, ddof=0) over the samplings.
        assert rows.loc[k, ["image_AUROC", "image_AUROC_std"]].tolist() == pytest.approx(
            [np.mean(image), np.std(image, ddof=0)], abs=1e-6
        )
        assert rows.loc[k, ["pixel_AUROC", "pixel_AUROC_std"]].tolist() == pytest.approx(
            [np.mean(pixel), np.std(pixel, ddof=0)], abs=1e-6
        )
    markdown = (spied_run["results"] / "results.md").read_text()
    first = table[(table.model == "FAPrompt") & (table.k == 1)].iloc[0]
    shown = f"{100 * first.image_AUROC:.1f} ± {100 * first.image_AUROC_std:.1f}"
    assert f"| FAPrompt | MVTecAD | disc | 1 | {shown} |" in markdown
    assert "mean ± std over 2 samplings" in markdown and "ddof=0" in markdown
    assert pd.read_csv(spied_run["results"] / "results.csv").shape == table.shape


def test_every_model_gets_the_same_reference_files(spied_run, root):
    shots = [shot for shot in plan_shots({"seed": SEED, "k_shot": KS, "samplings": SAMPLINGS}) if shot.k]
    memory, fitted = spied_run["memory"], spied_run["fitted"]
    memory = [entry for index, entry in enumerate(memory) if not index or entry != memory[index - 1]]  # validate, test
    # The prompt model's memory: one collection per shot and category; PatchCore: one fit at k = 0 and per shot.
    assert [(k, seed) for k, seed, _ in memory] == [(shot.k, shot.seed) for shot in shots]
    assert len(fitted) == 1 + len(shots)
    normal = sorted(str(path) for path in (root / "disc" / "train" / "good").iterdir())
    assert sorted(fitted[0]) == normal  # k = 0: the whole train split, as without the protocol
    rows = {}
    for path in spied_run["results"].rglob("rows/*-k*-s*.json"):
        content = json.loads(path.read_text())
        references = content["settings"]["references"]
        rows.setdefault((references["k_shot"], references["seed"]), []).append(sorted(references["files"]))
    for shot, (_, _, files), patchcore_files in zip(shots, memory, fitted[1:], strict=True):
        assert len(files) == shot.k and set(files) <= set(normal)
        assert sorted(patchcore_files) == sorted(files), f"k={shot.k}, sampling {shot.sampling}"
        assert rows[shot.k, shot.seed] == [sorted(files)] * 2  # both models' rows record these files
    assert len({tuple(sorted(files)) for k, _, files in memory if k == 1}) == SAMPLINGS  # the draws differ


@pytest.mark.slow
def test_changing_k_or_samplings_recomputes_only_rows_of_new_settings(spied_run, root, tiny_clip, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(spied_run["results"], results, symlinks=True)
    before = row_files(results)

    unchanged = ZeroShot().run_config(few_shot_config(root, results, tiny_clip))
    assert row_files(results) == before
    pd.testing.assert_frame_equal(unchanged, spied_run["table"])

    table = ZeroShot().run_config(few_shot_config(root, results, tiny_clip, k_shot=[1, 3], samplings=3))
    after = row_files(results)
    assert all(after[path] == mtime for path, mtime in before.items()), "earlier rows are kept as they were"
    new = sorted(path.name.split("-")[1] + "-" + path.name.split("-")[2] for path in set(after) - set(before))
    assert new == sorted(["k1-s2"] * 2 + [f"k3-s{s}" for s in range(3)] * 2)  # both models, only the new shots
    assert set(table.k) == {1, 3} and set(table.samplings) == {3}
    # The k = 1 row now averages three samplings: the two resumed and the new one.
    contents = [json.loads(path.read_text()) for path in after if "FAPrompt" in path.parts]
    metrics = [content["metrics"]["image_AUROC"] for content in contents
               if content["settings"].get("references", {}).get("k_shot") == 1]  # fmt: skip
    row = table[(table.model == "FAPrompt") & (table.category == "disc") & (table.k == 1)].iloc[0]
    assert len(metrics) == 3
    assert [row.image_AUROC, row.image_AUROC_std] == pytest.approx([np.mean(metrics), np.std(metrics)], abs=1e-9)


def test_k_shot_zero_gives_the_zero_shot_table_from_the_same_rows(spied_run, root, tiny_clip, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(spied_run["results"], results, symlinks=True)
    before = row_files(results)

    table = ZeroShot().run_config(few_shot_config(root, results, tiny_clip, k_shot=[0]))

    assert row_files(results) == before, "the k = 0 rows of the few-shot run are today's rows, resumed"
    columns = ["model", "dataset", "category", *METRICS, "notice", *(f"{name}_categories" for name in METRICS)]
    assert list(table.columns) == columns
    few_shot = spied_run["table"]
    expected = few_shot[few_shot.k == 0][columns]
    pd.testing.assert_frame_equal(table, expected.reset_index(drop=True))


def test_more_references_than_normal_images_is_refused_before_any_work(root, tiny_clip, tmp_path, monkeypatch):
    fits = []
    monkeypatch.setattr(Engine, "fit", lambda *args, **kwargs: fits.append(args))
    config = few_shot_config(root, tmp_path / "results", tiny_clip, k_shot=[0, 2, 9])
    with pytest.raises(ValueError, match=r"k_shot: 9 needs 9 normal .* MVTecAD/disc holds 4\. Lower k_shot"):
        ZeroShot().run_config(config)
    assert fits == [] and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k_shot": [1, 1]}, r"k_shot must be a non-empty list of distinct integers"),
        ({"k_shot": [0, -1]}, r"k_shot must be an integer of at least 0, got -1"),
        ({"samplings": 0}, r"samplings must be an integer of at least 1, got 0"),
    ],
)
def test_bad_protocol_settings_are_refused_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        plan_shots({"seed": 0, "k_shot": [0, 1], **settings})


def test_reference_settings_in_a_model_are_refused_when_the_protocol_sets_them(root, tiny_clip, tmp_path):
    config = few_shot_config(root, tmp_path / "results", tiny_clip)
    config["models"][0]["init_args"] = {**config["models"][0]["init_args"], "reference_seed": 3}
    with pytest.raises(ValueError, match=r"models\[0\]\.init_args sets \['reference_seed'\]"):
        ZeroShot().run_config(config)


def test_the_mean_row_is_the_spread_of_each_samplings_mean_over_categories():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"model": "M", "dataset": "D", "category": category, "k": 2, "sampling": sampling,
                          **{name: rng.uniform() for name in METRICS}, "notice": ""}
                         for sampling in range(5) for category in ("a", "b", "c")])  # fmt: skip
    table = summarise(rows)
    assert table.equals(summarise_few_shot(rows, METRICS))
    values = rows.pivot(index="sampling", columns="category", values="image_AP").to_numpy()  # (samplings, categories)
    mean = table[table.category == "mean"].iloc[0]
    per_sampling = values.mean(axis=1)
    assert [mean.image_AP, mean.image_AP_std] == pytest.approx([per_sampling.mean(), per_sampling.std(ddof=0)])
    b = table[table.category == "b"].iloc[0]
    assert [b.image_AP, b.image_AP_std, b.samplings] == pytest.approx([values[:, 1].mean(), values[:, 1].std(), 5])


def test_the_shots_draw_with_the_config_seed_plus_the_sampling():
    assert plan_shots({"seed": 7, "k_shot": [4, 0], "samplings": 3}) == [
        Shot(0, 0, None), Shot(4, 0, 7), Shot(4, 1, 8), Shot(4, 2, 9)
    ]  # fmt: skip
    assert plan_shots({"seed": 7}) == [Shot(0, 0, None)]


@pytest.mark.slow
def test_winclip_gets_k_shot_and_the_same_reference_images(spied_run, root, tiny_clip, small_promptad, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """anomalib's WinClip few-shot on a small random CLIP of its backbone's layout (ViT-B-16-plus-240: 240 px, patch
    16), registered under a name of open_clip's table: the released weights would be a download. FAPrompt's k = 2
    rows are the spied run's, resumed: the files its memory took are those its rows record."""
    import open_clip.factory
    from anomalib.models import WinClip
    from anomalib.models.image.winclip import torch_model

    layout = json.loads(Path(small_promptad["backbone"]).read_text())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "winclip-test-small", layout)
    monkeypatch.setattr(torch_model, "BACKBONE", "winclip-test-small")
    monkeypatch.setattr(torch_model, "PRETRAINED", None)
    winclip = []
    collect_winclip = WinClip.collect_reference_images

    def spy_winclip(self, dataloader):
        images = collect_winclip(self, dataloader)
        winclip.append((self.k_shot, len(images), list(self.trainer.datamodule.train_data.samples.image_path)))
        return images

    monkeypatch.setattr(WinClip, "collect_reference_images", spy_winclip)
    results = tmp_path / "results"
    shutil.copytree(spied_run["results"], results, symlinks=True)
    config = few_shot_config(root, results, tiny_clip, models=("FAPrompt",), k_shot=[2], samplings=1)
    config["models"].append({"class_path": "WinClip"})

    table = ZeroShot().run_config(config)

    assert set(table.model) == {"FAPrompt", "WinClip"} and set(table.k) == {2}
    assert table.image_AUROC.between(0, 1).all()
    [(k_shot, collected, files)] = winclip  # references are collected once: WinClip sets up once
    assert (k_shot, collected) == (2, 2)
    [row] = [json.loads(path.read_text()) for path in results.rglob("FAPrompt/*/rows/*-k2-s0-*.json")]
    assert sorted(files) == sorted(row["settings"]["references"]["files"])


def test_promptad_learns_per_category_and_shot_from_the_same_reference_files(root, small_promptad, tmp_path):
    """A method that learns its prompts from the k normal images (Learning.FEW_SHOT_PROMPTS): fitted afresh per
    category, k and sampling on the protocol's files (PatchCore's), no k = 0 row; its rows average its samplings."""
    config = few_shot_config(root, tmp_path / "results", {}, models=("Patchcore",), k_shot=[0, 1, 2])
    promptad = {key: value for key, value in small_promptad.items() if key != "category"}  # the datamodule's
    config["models"].append({"class_path": "PromptAD", "init_args": {**promptad, "max_epochs": 2}})
    with spying(stages=("fit",)) as (memory, fitted):
        table = ZeroShot().run_config(config)

    rows = table[(table.model == "PromptAD") & (table.category == "disc")].set_index("k")
    assert list(rows.index) == [1, 2]  # PromptAD scores only with references: no k = 0 row
    shots = [shot for shot in plan_shots({"seed": SEED, "k_shot": [0, 1, 2], "samplings": SAMPLINGS}) if shot.k]
    assert [(k, seed) for k, seed, _ in memory] == [(shot.k, shot.seed) for shot in shots]  # one fit per shot
    for (_, _, files), patchcore_files in zip(memory, fitted[1:], strict=True):
        assert sorted(files) == sorted(patchcore_files)
    for k in (1, 2):
        per_sampling = [
            json.loads(path.read_text())["metrics"]["image_AUROC"]
            for path in (tmp_path / "results").rglob(f"PromptAD/*/rows/*-k{k}-s*.json")
        ]
        assert len(per_sampling) == SAMPLINGS
        assert rows.loc[k, ["image_AUROC", "image_AUROC_std"]].tolist() == pytest.approx(
            [np.mean(per_sampling), np.std(per_sampling)], abs=1e-9
        )
