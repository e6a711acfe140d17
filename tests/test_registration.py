"""After installation anomalib resolves the short model names without any user import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_faprompt.methods import METHODS

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_unrelated_programs_do_not_import_torch():
    result = run(sys.executable, "-X", "importtime", "-c", "import json")
    assert result.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "_anomalib_faprompt_autoload" in imported, "the start-up hook is not installed"
    assert not [name for name in imported if name.split(".")[0] in {"torch", "anomalib", "anomalib_faprompt"}]


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_resolves_short_name(method):
    result = run(ANOMALIB, "test", "--model", method, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    config = run(ANOMALIB, "test", "--model", method, "--model.pretrained", "null", "--print_config")
    assert config.returncode == 0, config.stderr[-2000:]
    assert f"class_path: anomalib_faprompt.{method}" in config.stdout
    assert "prompt_weights: null" in config.stdout


def test_get_model_resolves_names_and_class_paths(small_clip):
    code = f"""
from anomalib.models import get_model, list_models
settings = dict(backbone={small_clip["backbone"]!r}, pretrained=None, image_size=224, dpam_layers=6)
assert type(get_model("FAPrompt", **settings)).__name__ == "FAPrompt"
assert type(get_model("anomaly_clip", feature_layers=[6], **settings)).__name__ == "AnomalyCLIP"
model = get_model({{"class_path": "AnomalyCLIP", "init_args": dict(feature_layers=[6], **settings)}})
assert type(model).__module__.startswith("anomalib_faprompt"), type(model)
assert {set(METHODS)!r} <= list_models(case="pascal")
print("resolved")
"""
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolved" in result.stdout


#: Runs first in a process whose start-up hook is off, as with ``python -S`` or packagers that skip ``.pth`` files.
WITHOUT_HOOK = (
    "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != '_anomalib_faprompt_autoload']\n"
)


def without_hook(main: str, *arguments: str) -> subprocess.CompletedProcess:
    code = WITHOUT_HOOK + f"from {main} import main\nsys.argv = ['anomalib', *sys.argv[1:]]\nmain()\n"
    return run(sys.executable, "-c", code, *arguments)


def test_without_the_start_up_hook_full_class_paths_and_anomalib_faprompt_work(small_clip, released_prompts,
                                                                              tiny_mvtec):  # fmt: skip
    """Plain ``anomalib`` does not know the short name; the full class path and ``anomalib-faprompt`` do."""
    model = [f"--model.{key}={value}" for key, value in small_clip.items()]
    arguments = [*model, "--model.prompt_weights", str(released_prompts["FAPrompt"]), "--data", "MVTecAD",
                 "--data.root", str(tiny_mvtec), "--data.category", "widget", "--data.num_workers", "0",
                 "--trainer.logger", "false"]  # fmt: skip
    short = without_hook("anomalib.cli.cli", "test", "--model", "FAPrompt", *arguments)
    assert short.returncode != 0 and "FAPrompt" in short.stderr, short.stderr[-2000:]
    metrics = []
    for main, name in (("anomalib.cli.cli", "anomalib_faprompt.FAPrompt"), ("anomalib_faprompt.cli", "FAPrompt")):
        result = without_hook(main, "test", "--model", name, *arguments)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics.append([line for line in result.stdout.splitlines() if "image_AUROC" in line])
    assert metrics[0] == metrics[1] and len(metrics[0]) == 1
