"""Logs a person reads in our runs: each message once, no third-party noise in ``zero_shot``, short exports, named bars.

Only runs of this package's models and subcommand are tidied; a run of any other model, or a user's own program,
prints what it prints without the plugin (``tests/test_plugin_only_adds.py``). The console runs are subprocesses
of the ``anomalib`` CLI with stdout and stderr merged into one stream, as a terminal shows them. ``COLUMNS`` is set
wide so that rich prints each log record on one line (at 80 columns it wraps long records into fragments, which are
not messages, and cuts paths in two).

What counts as a duplicated line (:func:`messages`): each non-blank line is reduced to its message: for anomalib's
rich records (``[time] LEVEL message file.py:line``, the time column blank when unchanged) the message column, for
plain ``logging`` records (``date time,ms - logger - LEVEL - message``) the part after the level, for any other
line (prints, warnings, tables) the line itself without surrounding spaces. Progress-bar lines (rich's bars end
with their speed, ``…it/s``) are left out: a bar may be redrawn. A message that occurs more than once is
duplicated, whether one record reached two handlers or one notice was logged again for each trainer or datamodule.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch.callbacks import TQDMProgressBar

from _anomalib_faprompt_autoload import IMPORT_WARNINGS
from anomalib_faprompt import FAPrompt
from anomalib_faprompt.callbacks import RunProgressBar
from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.models.readiness import UntrainedPromptsError

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
CKPT_WARNING = "ckpt_path is not provided"

_PLAIN_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - [\w.]+ - [A-Z]+ - (?P<message>.*)$")
_RICH_RECORD = re.compile(
    r"^(?:\[[^\]]*\])?\s*(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+(?P<message>.*?)\s+[\w.-]+\.py:\d+$"
)
_PROGRESS_BAR = re.compile(r"\d+/\d+ .*\d+\.\d+it/s")
#: Warnings printed by Python's ``warnings`` module or by Lightning's formatter for its own deprecations.
_WARNING_LINE = re.compile(r"\b\w*(FutureWarning|DeprecationWarning)\b|is deprecated")


def console_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "400", "PYTHONWARNINGS": "", **extra}


def without_import_warnings(output: str) -> str:
    """``output`` without the deprecation warnings (and their source lines) that importing anomalib prints.

    Every ``anomalib`` command prints them, whatever the model (they come from anomalib's own imports of timm and
    of its dinov2 package); the plugin leaves them as they are outside its own ``zero_shot`` subcommand.
    """
    lines, kept = output.splitlines(), []
    skip_source = False
    for line in lines:
        if skip_source and line.startswith(" "):
            skip_source = False
            continue
        skip_source = any(re.search(message, line) for message, _, _ in IMPORT_WARNINGS)
        if not skip_source:
            kept.append(line)
    return "\n".join(kept)


def run_console(command: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run ``command`` with stdout and stderr merged, as a terminal shows them; fail with the output's tail."""
    result = subprocess.run(
        command, cwd=cwd, env=console_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def messages(output: str) -> list[str]:
    """The messages of ``output``'s lines, as the module docstring defines them."""
    found = []
    for line in output.splitlines():
        line = line.rstrip()
        if not line.strip() or _PROGRESS_BAR.search(line):
            continue
        match = _PLAIN_RECORD.match(line) or _RICH_RECORD.match(line)
        found.append(match["message"].strip() if match else line.strip())
    return found


def duplicated(output: str) -> dict[str, int]:
    return {message: count for message, count in Counter(messages(output)).items() if count > 1}


def progress_bars(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if _PROGRESS_BAR.search(line)]


def small_clip_flags(small_clip) -> list[str]:
    return [
        "--model.backbone", small_clip["backbone"], "--model.pretrained", small_clip["pretrained"],
        "--model.image_size", str(small_clip["image_size"]), "--model.dpam_layers", str(small_clip["dpam_layers"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs") / "synthetic"
    return generate_synthetic_dataset(root, categories=["stripes", "disc"], n_train=2, n_test=2, image_size=64)


@pytest.fixture(scope="module")
def zero_shot_log(synthetic_root, small_clip) -> str:
    """The console of ``anomalib zero_shot`` with one model, one auxiliary and one target category, 1 epoch."""
    folder = synthetic_root.parent
    dataset = {"class_path": "MVTecAD", "init_args": {"root": str(synthetic_root)}}
    config = {
        "seed": 0, "accelerator": "cpu", "max_epochs": 1, "train_batch_size": 4, "eval_batch_size": 4,
        "num_workers": 0, "results_dir": str(folder / "results"),
        "auxiliary": {"dataset": dataset, "categories": ["stripes"]},
        "targets": [{"dataset": dataset, "categories": ["disc"]}],
        "models": [{"class_path": "FAPrompt", "init_args": dict(small_clip)}],
    }  # fmt: skip
    (folder / "zero_shot.yaml").write_text(yaml.safe_dump(config))
    return run_console([ANOMALIB, "zero_shot", "--config", "zero_shot.yaml"], cwd=folder)


@pytest.mark.slow
def test_zero_shot_log_has_no_duplicated_line(zero_shot_log):
    assert messages(zero_shot_log), zero_shot_log  # the run printed its records and table
    assert duplicated(zero_shot_log) == {}, zero_shot_log


@pytest.mark.slow
def test_zero_shot_log_has_no_third_party_deprecation_or_advert(zero_shot_log):
    noise = [line for line in zero_shot_log.splitlines() if _WARNING_LINE.search(line) or "litlogger" in line]
    assert noise == [], zero_shot_log
    # Lightning's note that the model's callbacks replace the same model's callbacks of the previous stage.
    assert "will override existing callbacks" not in zero_shot_log, zero_shot_log


@pytest.mark.slow
def test_zero_shot_progress_bars_name_model_dataset_and_category(zero_shot_log):
    bars = progress_bars(zero_shot_log)
    descriptions = [bar.split("━")[0].strip() for bar in bars]
    assert descriptions == [
        "FAPrompt · MVTecAD/stripes · Epoch 0/0",
        "FAPrompt · MVTecAD/disc · Validation",
        "FAPrompt · MVTecAD/disc · Testing",
    ], zero_shot_log


@pytest.mark.slow
def test_zero_shot_baseline_bars_are_named_and_its_test_after_fit_has_no_override_note(synthetic_root):
    """A one-class baseline of the protocol (PatchCore, fitted then tested on each target category) runs on the
    pipeline's engines too: its bars say what they run, and its own callbacks of the fit are replaced silently."""
    folder = synthetic_root.parent
    dataset = {"class_path": "MVTecAD", "init_args": {"root": str(synthetic_root)}}
    patchcore = {"backbone": "resnet18", "pre_trained": False, "layers": ["layer2", "layer3"]}
    config = {
        "seed": 0, "accelerator": "cpu", "eval_batch_size": 4, "num_workers": 0,
        "results_dir": str(folder / "baseline_results"),
        "auxiliary": {"dataset": dataset, "categories": ["stripes"]},
        "targets": [{"dataset": dataset, "categories": ["disc"]}],
        "models": [{"class_path": "Patchcore", "init_args": patchcore}],
    }  # fmt: skip
    (folder / "baseline.yaml").write_text(yaml.safe_dump(config))
    output = run_console([ANOMALIB, "zero_shot", "--config", "baseline.yaml"], cwd=folder)
    assert "will override existing callbacks" not in output, output
    descriptions = [bar.split("━")[0].strip() for bar in progress_bars(output) if "━" in bar]
    assert descriptions == ["Patchcore · MVTecAD/disc · Epoch 0/0", "Patchcore · MVTecAD/disc · Testing"], output


@pytest.mark.slow
def test_export_logs_a_handful_of_lines_naming_the_file(small_clip, released_prompts, tmp_path):
    command = [
        ANOMALIB, "export", "--model", "FAPrompt", *small_clip_flags(small_clip),
        "--model.prompt_weights", str(released_prompts["FAPrompt"]), "--export_type", "openvino",
        "--export_root", str(tmp_path / "export"),
    ]  # fmt: skip
    output = run_console(command, cwd=tmp_path)
    lines = [line for line in without_import_warnings(output).splitlines() if line.strip()]
    model_xml = tmp_path / "export" / "weights" / "openvino" / "model.xml"
    assert model_xml.is_file()
    assert len(lines) <= 6, output
    assert str(model_xml) in lines[-1], output
    assert duplicated(output) == {}, output


@pytest.mark.slow
def test_cli_predict_prints_its_output_folder_and_no_checkpoint_warning(
    small_clip, released_prompts, tiny_mvtec, tmp_path
):
    images = tiny_mvtec / "widget" / "test" / "spot"
    command = [
        ANOMALIB, "predict", "--model", "FAPrompt", *small_clip_flags(small_clip),
        "--model.prompt_weights", str(released_prompts["FAPrompt"]), "--data", str(images),
        "--default_root_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    output = run_console(command, cwd=tmp_path)
    assert CKPT_WARNING not in output, output
    written = sorted(path for path in (tmp_path / "out").rglob("*.png"))
    assert [path.name for path in written] == sorted(path.name for path in images.glob("*.png"))
    named = re.findall(r"visualisations of the predicted images written under (\S+)", output)
    assert len(named) == 1, output
    assert all(Path(named[0]) in path.resolve().parents for path in written), output
    assert duplicated(output) == {}, output


def _records(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_engine_predict_with_loaded_prompts_does_not_warn_about_a_checkpoint(
    small_clip, released_prompts, tiny_mvtec, tmp_path, caplog
):
    image = tiny_mvtec / "widget" / "test" / "spot" / "000.png"
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO):
        engine.predict(model, data_path=image)
    assert not any(CKPT_WARNING in message for message in _records(caplog)), _records(caplog)


def test_engine_predict_without_prompts_keeps_the_checkpoint_warning_and_refuses(
    small_clip, tiny_mvtec, tmp_path, caplog
):
    image = tiny_mvtec / "widget" / "test" / "spot" / "000.png"
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO), pytest.raises(UntrainedPromptsError, match="neither trained nor loaded"):
        engine.predict(FAPrompt(**small_clip), data_path=image)
    assert any(CKPT_WARNING in message for message in _records(caplog)), _records(caplog)


OVERRIDE_NOTE = "will override existing callbacks passed to Trainer"


def test_engine_predict_names_its_bar_and_replaces_the_models_own_callbacks_silently(
    small_clip, released_prompts, tiny_mvtec, tmp_path, caplog
):
    image = tiny_mvtec / "widget" / "test" / "spot" / "000.png"
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    with caplog.at_level(logging.INFO):
        engine.predict(model, data_path=image)  # two stages on one trainer: validation (nothing to see), predict
    assert not any(OVERRIDE_NOTE in message for message in _records(caplog)), _records(caplog)
    bar = engine.trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar)
    assert bar.predict_description == "FAPrompt · spot · Predicting"
    assert [type(callback) for callback in engine.trainer.callbacks].count(RunProgressBar) == 1


def test_callbacks_and_progress_bar_a_user_passed_keep_lightnings_behaviour(
    small_clip, released_prompts, tiny_mvtec, tmp_path, caplog
):
    image = tiny_mvtec / "widget" / "test" / "spot" / "000.png"
    model = FAPrompt(**small_clip, prompt_weights=released_prompts["FAPrompt"])
    users_bar = TQDMProgressBar()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, callbacks=[users_bar, PostProcessor()])
    with caplog.at_level(logging.INFO):
        engine.predict(model, data_path=image)
    notes = [message for message in _records(caplog) if OVERRIDE_NOTE in message]
    assert len(notes) == 1 and notes[0].endswith(": PostProcessor"), _records(caplog)  # the user's, replaced
    assert engine.trainer.progress_bar_callback is users_bar


def test_the_evaluators_device_notice_shows_once_per_process(caplog):
    """anomalib's evaluator warns at every setup over several devices (4–10 times per DDP run and process)."""
    from types import SimpleNamespace

    from anomalib.metrics import Evaluator

    from anomalib_faprompt import logs

    logs.install()
    evaluator, two_devices = Evaluator(test_metrics=[]), SimpleNamespace(num_devices=2)
    with caplog.at_level(logging.WARNING, logger="anomalib.metrics.evaluator"):
        for stage in ("fit", "test", "fit"):
            evaluator.setup(two_devices, None, stage)
        logging.getLogger("anomalib.metrics.evaluator").warning("another notice")
        logging.getLogger("anomalib.metrics.evaluator").warning("another notice")
    messages = Counter(record.getMessage() for record in caplog.records)
    assert messages == {logs.EVALUATOR_DEVICE_NOTICE: 1, "another notice": 2}
