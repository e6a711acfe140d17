"""Installing the plugin adds models and a subcommand, and changes nothing else in anomalib.

Each test runs the same program twice in fresh processes: once as installed, once as if the plugin were not
(its start-up hook removed from ``sys.meta_path`` before anything is imported, and ``anomalib_faprompt`` made
unimportable), and compares what a user sees and gets: metrics, files, the console's messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_faprompt.data import generate_synthetic_dataset
from test_logs import console_env, messages

#: Runs first in the "without the plugin" process: no start-up hook, no package.
WITHOUT_PLUGIN = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != '_anomalib_faprompt_autoload']\n"
    "sys.modules['anomalib_faprompt'] = None\n"
)
#: ``anomalib <arguments>`` as its console script runs it, with every random generator seeded first: anomalib's CLI
#: does not apply ``--seed_everything``, and a backbone with random weights differs from run to run otherwise.
ANOMALIB_MAIN = (
    "import random, sys\nimport numpy, torch\nrandom.seed(0); numpy.random.seed(0); torch.manual_seed(0)\n"
    "from anomalib.cli.cli import main\nsys.argv = ['anomalib', *sys.argv[1:]]\nmain()\n"
)
_TIME = re.compile(r"^\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\]\s*")
_DURATION = re.compile(r"\d+(\.\d+)?\s*(seconds|s|ms|it/s|FPS)\b|\d+:\d\d:\d\d")


def run_program(code: str, arguments: list[str], cwd: Path, plugin: bool) -> str:
    """Run ``code`` (as ``<string>``, its line numbers its own) in a fresh process, with or without the plugin."""
    cwd.mkdir(parents=True, exist_ok=True)
    program = ("" if plugin else WITHOUT_PLUGIN) + f"exec(compile({code!r}, '<string>', 'exec'))\n"
    result = subprocess.run(
        [sys.executable, "-c", program, *arguments], cwd=cwd, env=console_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def seen(output: str) -> list[str]:
    """The console's messages without times and durations (they differ between two runs of anything)."""
    return [" ".join(_DURATION.sub("<t>", _TIME.sub("", message)).split()) for message in messages(output)]


def files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("plain"), categories=["disc"], n_train=4, n_test=3,
                                      image_size=64)  # fmt: skip


USER_PROGRAM = """
import logging, warnings
logging.basicConfig(format="USER %(name)s: %(message)s", level=logging.INFO)
from anomalib.engine import Engine  # imports anomalib.models, timm, Lightning
from anomalib.loggers import configure_logger
configure_logger()
logging.getLogger("user").info("one record")
warnings.warn("my own future change", FutureWarning)
"""


def test_a_users_program_runs_as_without_the_plugin(tmp_path):
    runs = (("with", True), ("without", False))
    outputs = [run_program(USER_PROGRAM, [], tmp_path / kind, plugin) for kind, plugin in runs]
    assert seen(outputs[0]) == seen(outputs[1])
    assert "my own future change" in outputs[0]


PATCHCORE = [
    "--model", "Patchcore", "--model.backbone", "resnet18", "--model.pre_trained", "false",
    "--model.layers", "[layer2, layer3]", "--model.coreset_sampling_ratio", "1.0",
    "--data", "MVTecAD", "--data.category", "disc", "--data.num_workers", "0", "--data.eval_batch_size", "4",
    "--default_root_dir", "results", "--trainer.logger", "false", "--seed_everything", "0",
]  # fmt: skip


def metric_table(output: str) -> dict[str, str]:
    return {line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.splitlines()
            if line.count("│") == 3 and "metric" not in line}  # fmt: skip


@pytest.mark.slow
def test_patchcore_through_the_cli_is_unchanged_by_the_plugin(data, tmp_path):
    runs = {}
    for kind, plugin in (("with", True), ("without", False)):
        output = run_program(ANOMALIB_MAIN, ["train", *PATCHCORE, "--data.root", str(data)], tmp_path / kind, plugin)
        runs[kind] = (output, metric_table(output), files(tmp_path / kind / "results"))
    (with_output, with_metrics, with_files), (without_output, without_metrics, without_files) = runs.values()
    assert with_metrics and with_metrics == without_metrics
    assert with_files == without_files
    assert seen(with_output) == seen(without_output)


ENGINE_PROGRAM = """
import json, sys
from lightning.pytorch import seed_everything
seed_everything(0)
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore

seed_everything(0)
model = Patchcore(backbone="resnet18", pre_trained=False, layers=["layer2", "layer3"], coreset_sampling_ratio=1.0)
datamodule = MVTecAD(root=sys.argv[1], category="disc", num_workers=0, eval_batch_size=4)
engine = Engine(default_root_dir="results", logger=False, accelerator="cpu")
engine.fit(model, datamodule=datamodule)
print("METRICS " + json.dumps(engine.test(model, datamodule=datamodule)[0], sort_keys=True))
"""


@pytest.mark.slow
def test_patchcore_through_the_engine_is_unchanged_by_the_plugin(data, tmp_path):
    runs = {}
    for kind, plugin in (("with", True), ("without", False)):
        output = run_program(ENGINE_PROGRAM, [str(data)], tmp_path / kind, plugin)
        [line] = [line for line in output.splitlines() if line.startswith("METRICS ")]
        runs[kind] = (output, json.loads(line.removeprefix("METRICS ")), files(tmp_path / kind / "results"))
    (with_output, with_metrics, with_files), (without_output, without_metrics, without_files) = runs.values()
    assert with_metrics == without_metrics
    assert with_files == without_files
    assert seen(with_output) == seen(without_output)
