"""Reruns of ``anomalib zero_shot``: resume only what the same settings produced, survive kills, refuse a second run.

Tiny synthetic data (one auxiliary and one target category, 64 px) and the small CLIP at its native 112 px,
one epoch: a run takes seconds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_faprompt import AnomalyCLIP
from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.pipelines import ZeroShot
from conftest import flip_tensor_byte
from test_zero_shot import protocol

AUXILIARY, TARGETS = ["stripes"], ["disc"]
METRICS = ["image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("data"), categories=[*AUXILIARY, "checker", *TARGETS], n_train=2, n_test=2,
        image_size=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_clip(small_clip) -> dict[str, Any]:
    return {**small_clip, "image_size": 112}  # the small CLIP's native size: 4x cheaper than 224


def config_for(root: Path, results: Path, tiny_clip: dict, models: tuple[str, ...] = ("FAPrompt",),
               dataset: dict | None = None) -> dict:  # fmt: skip
    # A copy: the tests change it.
    config = copy.deepcopy(protocol(root, results, tiny_clip, list(models), max_epochs=1, dataset=dataset))
    config["auxiliary"]["categories"] = list(AUXILIARY)
    config["targets"][0]["categories"] = list(TARGETS)
    return config


@pytest.fixture
def fits(monkeypatch) -> list[str]:
    """Names of the models ``Engine.fit`` was called with during the test."""
    fitted: list[str] = []
    original = Engine.fit

    def fit(self, model, *args, **kwargs):
        fitted.append(type(model).__name__)
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", fit)
    return fitted


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, root, tiny_clip) -> tuple[Path, pd.DataFrame]:
    """One FAPrompt run, copied by the tests that change its folder."""
    results = tmp_path_factory.mktemp("first") / "results"
    table = ZeroShot().run_config(config_for(root, results, tiny_clip))
    return results, table


@pytest.fixture
def previous(tmp_path, first_run) -> tuple[Path, pd.DataFrame]:
    """A private copy of the first run's results directory."""
    results = tmp_path / "results"
    shutil.copytree(first_run[0], results, symlinks=True)  # anomalib's "latest" links stay links
    return results, first_run[1]


def prompt_files(results: Path) -> list[Path]:
    """Every prompt file, the Lightning checkpoints' copies included."""
    return sorted(results.rglob("prompts.pt"))


def learned_prompts(results: Path) -> list[Path]:
    """The prompt files the pipeline resumes from."""
    return [path for path in result_files(results) if path.name == "prompts.pt"]


def result_files(results: Path) -> dict[Path, int]:
    """Prompt files (not the Lightning checkpoints' copies) and row files, with their modification times."""
    files = [path for path in results.rglob("prompts.pt") if "weights" not in path.parts]
    files += [path for path in results.rglob("*.json") if path.parent.name == "rows"]
    return {path: path.stat().st_mtime_ns for path in files}


def settings_of(prompts: Path) -> dict[str, Any]:
    """The settings recorded next to a prompt file."""
    return json.loads((prompts.parent / "settings.json").read_text())["settings"]


def values(table: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    return {(row.model, row.category, name): getattr(row, name) for row in table.itertuples() for name in METRICS}


# Resume: the same settings reuse, other settings recompute ---------------------------------------------------------


def test_an_unchanged_rerun_reuses_prompts_and_rows(previous, root, tiny_clip, fits):
    results, table = previous
    before = result_files(results)
    assert len(before) == 2  # prompts.pt and one row

    rerun = ZeroShot().run_config(config_for(root, results, tiny_clip))

    assert fits == []
    assert result_files(results) == before
    assert values(rerun) == values(table)


@pytest.mark.parametrize(
    ("setting", "change"),
    [
        ("max_epochs", lambda config: config.update(max_epochs=2)),
        ("seed", lambda config: config.update(seed=1)),
        ("auxiliary categories", lambda config: config["auxiliary"].update(categories=["stripes", "checker"])),
        ("sigma (model init arg)", lambda config: config["models"][0]["init_args"].update(sigma=2.0)),
    ],
)
def test_a_changed_setting_retrains_prompts_and_recomputes_rows(previous, root, tiny_clip, fits, tmp_path, setting,
                                                                 change):  # fmt: skip
    results, table = previous
    before = result_files(results)
    config = config_for(root, results, tiny_clip)
    change(config)

    rerun = ZeroShot().run_config(config)

    assert fits == ["FAPrompt"], f"changing {setting} must retrain the prompts"
    assert len(learned_prompts(results)) == 2, "the new prompts must not overwrite the old ones"
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items()), "old results are kept"
    # The rerun reports what a run from scratch with the changed settings reports.
    fresh = ZeroShot().run_config({**config, "results_dir": str(tmp_path / "fresh")})
    assert values(rerun) == pytest.approx(values(fresh), abs=1e-6)
    assert values(rerun)["FAPrompt", "disc", "pixel_AUROC"] != pytest.approx(
        values(table)["FAPrompt", "disc", "pixel_AUROC"], abs=1e-6
    )


def test_a_changed_target_setting_recomputes_rows_but_keeps_prompts(previous, root, tiny_clip, fits, tmp_path):
    results, _ = previous
    copy = tmp_path / "target"
    shutil.copytree(root, copy)
    config = config_for(root, results, tiny_clip)
    config["targets"][0]["dataset"] = {"class_path": "MVTecAD", "init_args": {"root": str(copy)}}
    before = result_files(results)

    ZeroShot().run_config(config)

    assert fits == []
    after = result_files(results)
    rows = [path for path in after if path.parent.name == "rows"]
    assert len(rows) == 2, "a row for the new target, the old one kept"
    assert all(after[path] == mtime for path, mtime in before.items())


def test_two_variants_of_a_model_get_their_own_prompts_rows_and_names(tmp_path, root, tiny_clip, fits):
    results = tmp_path / "results"
    config = config_for(root, results, tiny_clip, models=("AnomalyCLIP", "AnomalyCLIP", "FAPrompt"))
    config["models"][1]["init_args"] = {**config["models"][1]["init_args"], "feature_layers": [8]}  # not shared

    table = ZeroShot().run_config(config)

    assert fits == ["AnomalyCLIP", "AnomalyCLIP", "FAPrompt"]
    assert list(table.model.unique()) == ["AnomalyCLIP[feature_layers=[2,4,6,8]]", "AnomalyCLIP[feature_layers=8]",
                                          "FAPrompt"]  # fmt: skip
    assert len(learned_prompts(results)) == 3
    rows = table[table.category == "disc"].set_index("model")
    assert rows.pixel_AUROC.nunique() == 3
    # Each row is its own variant's: recompute pixel AUROC from that variant's prompts with scikit-learn.
    datamodule = MVTecAD(root=root, category="disc", eval_batch_size=8, num_workers=0)
    for feature_layers, label in (((2, 4, 6, 8), "AnomalyCLIP[feature_layers=[2,4,6,8]]"),
                                  ((8,), "AnomalyCLIP[feature_layers=8]")):  # fmt: skip
        [prompts] = [path for path in results.glob("AnomalyCLIP/*/prompts.pt")
                     if settings_of(path)["init_args"]["feature_layers"] == list(feature_layers)]  # fmt: skip
        model = AnomalyCLIP(**tiny_clip, feature_layers=feature_layers, prompt_weights=prompts, post_processor=False,
                            visualizer=False)  # fmt: skip
        batches = Engine(default_root_dir=tmp_path, accelerator="cpu").predict(model, datamodule=datamodule)
        maps = torch.cat([batch.anomaly_map for batch in batches]).flatten().numpy()
        masks = torch.cat([batch.gt_mask for batch in batches]).flatten().numpy()
        assert rows.loc[label, "pixel_AUROC"] == pytest.approx(roc_auc_score(masks, maps), abs=1e-6)


def test_the_same_model_twice_is_refused(tmp_path, root, tiny_clip):
    config = config_for(root, tmp_path / "results", tiny_clip, models=("FAPrompt", "FAPrompt"))
    with pytest.raises(ValueError, match=r"models\[0\] and models\[1\] are the same FAPrompt"):
        ZeroShot().run_config(config)


# Untrained prompts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["config", "init_args"])
def test_max_epochs_0_is_refused_before_fitting(tmp_path, root, tiny_clip, fits, where):
    results = tmp_path / "results"
    config = config_for(root, results, tiny_clip)
    if where == "config":
        config["max_epochs"] = 0
    else:
        config["models"][0]["init_args"]["max_epochs"] = 0
    with pytest.raises(ValueError, match=r"max_epochs must be .*1.*got 0"):
        ZeroShot().run_config(config)
    assert fits == []
    assert prompt_files(tmp_path) == []


def test_a_fit_without_an_optimiser_step_saves_no_prompts(tmp_path, root, tiny_clip, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(Engine, "fit", lambda *args, **kwargs: None)  # as if the data gave no training batch
    with pytest.raises(RuntimeError, match=r"FAPrompt.*no optimiser step.*max_epochs"):
        ZeroShot().run_config(config_for(root, results, tiny_clip))
    assert prompt_files(tmp_path) == []


# Files left by a kill -----------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_a_truncated_row_is_set_aside_and_recomputed(previous, root, tiny_clip, fits, caplog):
    results, table = previous
    [row] = [path for path in result_files(results) if path.suffix == ".json"]
    truncate(row)
    leftover = row.with_name(f"{row.name}.tmp-99999")  # what a kill during the atomic write leaves
    leftover.write_text("{")

    with caplog.at_level(logging.WARNING):
        rerun = ZeroShot().run_config(config_for(root, results, tiny_clip))

    assert fits == []
    assert str(row) in caplog.text
    assert len(list(row.parent.glob(f"{row.name}.corrupt-*"))) == 1
    assert not leftover.exists()
    assert values(rerun) == pytest.approx(values(table), abs=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "cut where torch reads an OSError", "bytes changed"])
def test_truncated_prompts_are_set_aside_and_retrained(previous, root, tiny_clip, fits, caplog, damage):
    """Half a file (torch: no zip directory), a cut where torch raises a bare "OSError: [Errno 22]" naming no file,
    or its numbers changed on disk (torch loads it: only the archive's checksums tell)."""
    results, table = previous
    [prompts] = [path for path in result_files(results) if path.name == "prompts.pt"]
    if damage == "truncated":
        truncate(prompts)
    elif damage == "cut where torch reads an OSError":
        cut_where_torch_raises_oserror(prompts)
    else:
        flip_tensor_byte(prompts)

    with caplog.at_level(logging.WARNING):
        rerun = ZeroShot().run_config(config_for(root, results, tiny_clip))

    assert fits == ["FAPrompt"]
    assert str(prompts) in caplog.text
    assert len(list(prompts.parent.glob("prompts.pt.corrupt-*"))) == 1
    assert values(rerun) == pytest.approx(values(table), abs=1e-6)  # the same seed gives the same prompts


def cut_where_torch_raises_oserror(path: Path) -> None:
    """Cut ``path`` short at the first length (in steps of 64 bytes) at which ``torch.load`` raises ``OSError``."""
    content = path.read_bytes()
    for length in range(64, len(content), 64):
        path.write_bytes(content[:length])
        try:
            torch.load(path, weights_only=True)
        except OSError:
            return
        except Exception:  # other cuts fail otherwise (no zip directory): look further
            continue
    pytest.fail(f"no cut of {path} makes torch.load raise OSError")


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    from anomalib_faprompt.pipelines.result_files import atomic_write

    target = tmp_path / "row.json"
    target.write_text('{"old": 1}')

    def write_half_then_die(path: Path) -> None:
        path.write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write_half_then_die)
    assert target.read_text() == '{"old": 1}'
    assert sorted(tmp_path.iterdir()) == [target]


# Concurrent runs ----------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_results_dir_is_refused(tmp_path, root, tiny_clip, fits):
    import os

    from anomalib_faprompt.pipelines.result_files import ResultsDirLockedError, results_dir_lock

    results = tmp_path / "results"
    config = config_for(root, results, tiny_clip)
    refusal = rf"{re.escape(str(results))}.*pid {os.getpid()}"
    with results_dir_lock(results), pytest.raises(ResultsDirLockedError, match=refusal):
        ZeroShot().run_config(config)
    assert fits == []
    assert prompt_files(tmp_path) == []


def test_heat_maps_of_a_multi_layer_model_are_drawn_from_maps_in_the_unit_range(tmp_path, root, tiny_clip, monkeypatch):
    """AnomalyCLIP's raw map sums one probability per layer (up to 4 here); image conversion would wrap it past 1.

    The visualiser must see the post-processed map in [0, 1] (with its predicted mask), while the table keeps the
    metrics of the raw outputs.
    """
    from anomalib_faprompt.visualization import HeatMapVisualizer

    seen: list[tuple[float, float, bool]] = []
    original = HeatMapVisualizer.on_test_batch_end

    def record(self, trainer, pl_module, outputs, batch, *args, **kwargs):
        seen.append((float(outputs.anomaly_map.min()), float(outputs.anomaly_map.max()), outputs.pred_mask is not None))
        return original(self, trainer, pl_module, outputs, batch, *args, **kwargs)

    monkeypatch.setattr(HeatMapVisualizer, "on_test_batch_end", record)
    config = config_for(root, tmp_path / "results", tiny_clip, models=("AnomalyCLIP",))
    config["models"][0]["init_args"]["feature_layers"] = [2, 4, 6, 8]
    table = ZeroShot().run_config(config)
    assert seen, "the visualiser drew nothing"
    assert all(low >= 0.0 and high <= 1.0 and has_mask for low, high, has_mask in seen), seen
    # The metrics are still those of the raw outputs.
    [prompts] = (tmp_path / "results").glob("AnomalyCLIP/*/prompts.pt")
    model = AnomalyCLIP(**tiny_clip, feature_layers=[2, 4, 6, 8], prompt_weights=prompts, post_processor=False,
                        visualizer=False)  # fmt: skip
    batches = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False).predict(
        model, datamodule=MVTecAD(root=root, category=TARGETS[0], num_workers=0)
    )
    maps = torch.cat([batch.anomaly_map for batch in batches]).flatten().numpy()
    masks = torch.cat([batch.gt_mask for batch in batches]).flatten().numpy()
    row = table[table.category == TARGETS[0]].iloc[0]
    assert row.pixel_AUROC == pytest.approx(roc_auc_score(masks, maps), abs=1e-6)


# Outputs: one folder level per model, dataset and category; the datamodule's name; heat-maps; notices ---------------

SYNTHETIC = {"n_train": 2, "n_test": 2, "image_size": 64}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, tiny_clip) -> tuple[Path, Path, pd.DataFrame, str]:
    """FAPrompt and PatchCore (random backbone) on SyntheticAD categories the run generates: nothing on disk before."""
    folder = tmp_path_factory.mktemp("synthetic_run")
    data, results = folder / "data", folder / "results"
    dataset = {"class_path": "SyntheticAD", "init_args": {"root": str(data), **SYNTHETIC}}
    config = config_for(data, results, tiny_clip, models=("FAPrompt", "Patchcore"), dataset=dataset)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        table = ZeroShot().run_config(config)
    return data, results, table, printed.getvalue()


def test_the_results_tree_has_one_level_per_model_dataset_and_category(synthetic_run):
    data, results, _, _ = synthetic_run
    [faprompt] = [f"FAPrompt/{path.name}" for path in (results / "FAPrompt").iterdir()]
    [patchcore] = [f"Patchcore/{path.name}" for path in (results / "Patchcore").iterdir()]
    test_images = sorted(path.relative_to(data / "disc" / "test") for path in (data / "disc" / "test").rglob("*.png"))
    kinds = sorted({image.parent.name for image in test_images})  # "good" and the generated defects

    def category_folders(model: str) -> set[str]:
        category = f"{model}/SyntheticAD/disc"
        images = [f"{category}/images", *(f"{category}/images/{kind}" for kind in kinds)]
        return {f"{model}/SyntheticAD", category, *images, f"{category}/weights", f"{category}/weights/lightning"}

    expected = {
        "FAPrompt", faprompt, f"{faprompt}/rows", f"{faprompt}/weights", f"{faprompt}/weights/lightning",  # the fit
        *category_folders(faprompt),
        "Patchcore", patchcore, f"{patchcore}/rows", *category_folders(patchcore),
    }  # fmt: skip
    assert {path.relative_to(results).as_posix() for path in results.rglob("*") if path.is_dir()} == expected
    assert not [path for path in results.rglob("*") if path.is_symlink()], "no versioned folders, no 'latest' links"
    assert (results / faprompt / "prompts.pt").is_file()
    assert (results / faprompt / "weights" / "lightning" / "model.ckpt").is_file()  # the prompt learning's checkpoint
    for model in (faprompt, patchcore):
        images = results / model / "SyntheticAD" / "disc" / "images"
        assert sorted(path.relative_to(images) for path in images.rglob("*.png")) == test_images  # one per image


def test_the_dataset_column_and_folders_name_the_datamodule(synthetic_run):
    data, results, table, printed = synthetic_run
    assert sorted(path.name for path in data.iterdir()) == ["disc", "stripes"]  # written on first use by the run
    assert set(table.dataset) == {"SyntheticAD", "mean"}
    assert "| FAPrompt | SyntheticAD | disc |" in printed
    rows = sorted(path.name.split("-")[0] for path in results.glob("*/*/rows/*.json"))
    assert rows == ["SyntheticAD_disc", "SyntheticAD_disc"]


def test_a_folder_dataset_is_named_by_its_name_argument(root):
    from anomalib_faprompt.pipelines.datasets import DatasetSpec

    folder = {"name": "discs", "root": str(root / "disc"), "normal_dir": "train/good", "abnormal_dir": "test/crack"}
    spec = DatasetSpec({"dataset": {"class_path": "Folder", "init_args": folder}}, {"num_workers": 0})
    assert (spec.name, spec.categories) == ("discs", ["discs"])


def test_heat_map_panels_of_models_and_baselines_are_titled_and_distinct(synthetic_run):
    """FAPrompt: Image, Gt Mask, Pred Mask, Image + Anomaly Map. PatchCore, run without post-processor, has no
    predicted mask: anomalib's default figure then repeats the input as an untitled fourth panel; here it has three."""
    _, results, _, _ = synthetic_run
    for model, panels in (("FAPrompt", 4), ("Patchcore", 3)):
        images = sorted(results.glob(f"{model}/*/SyntheticAD/disc/images/*/*.png"))
        assert images
        for path in images:
            with Image.open(path) as image:
                assert image.width == panels * 256, (path, image.size)
                assert image.height > 256, "a strip below the panels names the untrained weights"


def test_untrained_weights_are_named_in_the_table(synthetic_run):
    _, results, _, printed = synthetic_run
    markdown = (results / "results.md").read_text()
    for text in (markdown, printed):
        assert "FAPrompt: the random small CLIP of shared/golden (clip_small_seed0.pt)" in text
        assert "Patchcore: a backbone with random weights (pre_trained=False)" in text
    notices = pd.read_csv(results / "results.csv").set_index(["model", "category"]).notice
    golden = "the random small CLIP of shared/golden (clip_small_seed0.pt)"
    assert notices["FAPrompt", "disc"] == notices["FAPrompt", "mean"] == golden


def test_the_chart_shows_the_chance_line_and_the_notices(synthetic_run):
    from anomalib_faprompt.pipelines.report import results_figure

    _, _, table, _ = synthetic_run
    figure = results_figure(table)
    [axes] = figure.axes
    chance = [line for line in axes.get_lines() if list(line.get_ydata()) == [50, 50]]
    assert [line.get_label() for line in chance] == ["AUROC chance level (50 %)"]
    assert "AUROC chance level (50 %)" in [text.get_text() for text in axes.get_legend().get_texts()]
    notes = " ".join(text.get_text() for text in figure.texts)
    assert "FAPrompt: the random small CLIP of shared/golden (clip_small_seed0.pt)" in notes
    assert "Patchcore: a backbone with random weights (pre_trained=False)" in notes


def test_a_one_class_baseline_is_scored_on_its_raw_outputs(tmp_path, root, tiny_clip, monkeypatch):
    """PatchCore is fitted (with anomalib's post-processor) then tested: the test must not keep the fit's
    post-processor, which would min-max normalise and clamp its maps (adding a predicted mask) before the metrics."""
    from anomalib_faprompt.components.metrics import RawOutputEvaluator

    post_processed: list[bool] = []
    original = RawOutputEvaluator.update

    def update(self, metrics, batch, raw):
        post_processed.append(batch.pred_mask is not None)
        return original(self, metrics, batch, raw)

    monkeypatch.setattr(RawOutputEvaluator, "update", update)
    ZeroShot().run_config(config_for(root, tmp_path / "results", tiny_clip, models=("Patchcore",)))
    assert post_processed
    assert not any(post_processed), "post-processed outputs reached the metrics"


# SIGTERM: how schedulers stop jobs ----------------------------------------------------------------------------------

#: ``anomalib zero_shot`` in a fresh process, paused inside the first training (or test) step so that the test can
#: send SIGTERM there: ``python -c SIGNALLED_RUN <train|test> <config>``.
SIGNALLED_RUN = """
import sys, time
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.models.training_rules import MaskSupervisedPromptLearning

stage, config = sys.argv[1:]
owner, hook = MaskSupervisedPromptLearning, "training_step"
if stage == "test":
    owner, hook = PromptMethod, "test_step"
step = getattr(owner, hook)

def paused(self, *args, **kwargs):
    print("IN STEP", flush=True)
    time.sleep(120)
    return step(self, *args, **kwargs)

setattr(owner, hook, paused)
from anomalib.cli.cli import main
sys.argv = ["anomalib", "zero_shot", "--config", config]
main()
"""


class Output:
    """The lines a process prints, read as they come (a thread), so that a test can wait for one of them."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str, timeout: float) -> bool:
        """Whether the line ``marker`` came before the output ended or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.seen.append(line)
            if line.strip() == marker:
                return True
        return False

    def text(self) -> str:
        """Everything printed so far (all of it once the process has ended)."""
        self.reader.join(timeout=30)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.mark.parametrize("stage", ["train", "test"])
def test_sigterm_stops_the_run_with_an_error_status_and_the_rerun_resumes(tmp_path, root, tiny_clip, first_run, fits,
                                                                         stage):  # fmt: skip
    from anomalib_faprompt.pipelines.result_files import results_dir_lock

    results = tmp_path / "results"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(root, results, tiny_clip)))
    process = subprocess.Popen([sys.executable, "-c", SIGNALLED_RUN, stage, str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = Output(process)
    try:
        assert output.wait_for("IN STEP", timeout=300), output.text()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        process.kill()
    printed = output.text()

    assert process.returncode == 128 + signal.SIGTERM, printed[-3000:]
    assert "zero_shot stopped by SIGTERM" in printed
    assert not (results / "results.csv").exists()
    with results_dir_lock(results):  # released: another run may take it
        pass
    kept = learned_prompts(results)
    assert len(kept) == (0 if stage == "train" else 1), "prompts learned before the signal are kept"

    rerun = ZeroShot().run_config(config_for(root, results, tiny_clip))

    assert fits == (["FAPrompt"] if stage == "train" else []), "the rerun resumes the prompts learned before"
    assert values(rerun) == pytest.approx(values(first_run[1]), abs=1e-6), "the table of an uninterrupted run"


# Targets: each category once, and never one the prompts were learned on ---------------------------------------------


def test_an_auxiliary_category_among_the_targets_is_refused_before_any_work(tmp_path, root, tiny_clip, fits):
    config = config_for(root, tmp_path / "results", tiny_clip)
    config["targets"][0]["categories"] = [*TARGETS, AUXILIARY[0]]
    with pytest.raises(ValueError, match=rf"MVTecAD/{AUXILIARY[0]}: auxiliary categories that are also targets.*"
                                         r"allow_overlap: true"):  # fmt: skip
        ZeroShot().run_config(config)
    assert fits == []
    assert not (tmp_path / "results").exists()


def test_allow_overlap_runs_and_marks_the_overlapping_rows(tmp_path, root, tiny_clip, first_run):
    results = tmp_path / "results"
    config = config_for(root, results, tiny_clip) | {"allow_overlap": True}
    config["targets"][0]["categories"] = [*TARGETS, AUXILIARY[0]]

    table = ZeroShot().run_config(config)

    marked = table.set_index("category").auxiliary_overlap
    assert marked.to_dict() == {TARGETS[0]: False, AUXILIARY[0]: True, "mean": True}
    assert values(table[table.category == TARGETS[0]]) == pytest.approx(
        values(first_run[1][first_run[1].category == TARGETS[0]]), abs=1e-6
    )
    markdown = (results / "results.md").read_text()
    assert f"| FAPrompt | MVTecAD | {AUXILIARY[0]} (auxiliary) |" in markdown
    assert "(auxiliary): also an auxiliary category" in markdown
    assert pd.read_csv(results / "results.csv").auxiliary_overlap.tolist() == [False, True, True]


@pytest.mark.parametrize("where", ["one entry", "two entries"])
def test_a_target_category_listed_twice_is_refused(tmp_path, root, tiny_clip, fits, where):
    config = config_for(root, tmp_path / "results", tiny_clip)
    if where == "one entry":
        config["targets"][0]["categories"] = [TARGETS[0], TARGETS[0]]
        refusal = rf"targets\[0\].categories lists \['{TARGETS[0]}'\] more than once"
    else:
        config["targets"].append(copy.deepcopy(config["targets"][0]))
        refusal = rf"targets\[0\] and targets\[1\] both list MVTecAD/{TARGETS[0]}: .*two identical rows"
    with pytest.raises(ValueError, match=refusal):
        ZeroShot().run_config(config)
    assert fits == []
    assert not (tmp_path / "results").exists()


# Config mistakes: one line naming the key, nothing left behind ------------------------------------------------------


@pytest.mark.parametrize(
    ("mistake", "change", "expected"),
    [
        ("misspelt model", lambda c: c["models"][0].update(class_path="FAPromt"),
         "error: models[0].class_path 'FAPromt' is not an anomalib model; did you mean 'FAPrompt'? Known: "),
        ("misspelt init arg", lambda c: c["models"][0]["init_args"].update(sigmaa=2.0),
         "error: models[0].init_args.sigmaa is not an argument of FAPrompt; did you mean 'sigma'? Its arguments: "),
        ("no categories", lambda c: c["targets"][0].update(categories=[]),
         "error: targets[0].categories must be 'all' or a non-empty list of category names"),
        ("misspelt datamodule", lambda c: c["targets"][0].update(dataset={"class_path": "MVTecDA"}),
         "error: targets[0].dataset.class_path 'MVTecDA' is not an anomalib datamodule; did you mean 'MVTecAD'?"),
        ("results_dir is a file", None, "error: results_dir '{results}' is a file, not a folder"),
    ],
)  # fmt: skip
def test_a_config_mistake_ends_in_one_line_naming_the_key(tmp_path, root, tiny_clip, capsys, mistake, change,
                                                          expected):  # fmt: skip
    from argparse import Namespace

    results = tmp_path / "results"
    config = config_for(root, results, tiny_clip)
    if change is None:
        results.write_text("not a folder")
    else:
        change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit) as exit_info:
        ZeroShot().run(Namespace(config=str(path)))

    assert exit_info.value.code == 2, mistake
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(expected.format(results=results)), error[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml"] + ["results"] * (change is None)


# Undefined metrics in the table -------------------------------------------------------------------------------------


def test_a_category_without_normal_test_images_is_n_a_and_left_out_of_the_mean(tmp_path, root, tiny_clip, first_run,
                                                                              caplog):  # fmt: skip
    """Its image metrics are undefined (only anomalous images); its pixel metrics are not (the masks have both)."""
    data = tmp_path / "data"
    shutil.copytree(root, data)
    shutil.copytree(data / TARGETS[0], data / "only_defects")
    shutil.rmtree(data / "only_defects" / "test" / "good")
    [prompts] = learned_prompts(first_run[0])
    results = tmp_path / "results"
    config = config_for(data, results, tiny_clip)
    config["models"][0]["init_args"]["prompt_weights"] = str(prompts)  # the first run's prompts: nothing to learn
    config["targets"][0]["categories"] = [TARGETS[0], "only_defects"]

    with caplog.at_level(logging.WARNING):
        table = ZeroShot().run_config(config)

    rows = table.set_index("category")
    image = ["image_AUROC", "image_AP"]
    assert rows.loc["only_defects", image].isna().all()
    assert (
        "image_AUROC is undefined on MVTecAD/only_defects (test split): its 2 images are all anomalous" in caplog.text
    )
    defined = values(first_run[1][first_run[1].category == TARGETS[0]])
    assert values(table[table.category == TARGETS[0]]) == pytest.approx(defined, abs=1e-6)
    for name in METRICS:  # means over the categories where the metric is defined, counted
        entered = [TARGETS[0]] if name in image else [TARGETS[0], "only_defects"]
        assert rows.loc["mean", name] == pytest.approx(rows.loc[entered, name].mean(), abs=1e-9)
        assert rows.loc["mean", f"{name}_categories"] == len(entered)
    markdown = (results / "results.md").read_text()
    mean = f"{100 * rows.loc['mean', 'image_AUROC']:.1f} (1/2)"
    assert "| FAPrompt | MVTecAD | only_defects | n/a | n/a | " in markdown
    assert f"| FAPrompt | mean | mean | {mean} |" in markdown
    assert "n/a: undefined on that category" in markdown
    stored = [json.loads(path.read_text()) for path in results.rglob("rows/MVTecAD_only_defects-*.json")]
    assert [row["metrics"]["image_AUROC"] for row in stored] == [None]  # JSON null, read back as NaN on a rerun
    rerun = ZeroShot().run_config(config)
    pd.testing.assert_frame_equal(rerun, table)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "error: zero_shot config '{path}' does not exist."),
        ("models: [FAPrompt\nseed: 0\n", "error: zero_shot config '{path}' is not valid YAML: while parsing a flow"),
        ("- FAPrompt\n", "error: zero_shot config '{path}' must be a mapping of settings"),
    ],
)
def test_an_unreadable_config_file_ends_in_one_line_naming_it(tmp_path, capsys, content, expected):
    from argparse import Namespace

    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        ZeroShot().run(Namespace(config=str(path)))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(expected.format(path=path)), error[-1000:]
