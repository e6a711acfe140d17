"""The README's offline quickstart runs verbatim and does what it says.

The section's fenced blocks are extracted from ``README.md`` and run as written, each command in its own
process, in a folder laid out like the repository root (``configs`` beside it, ``../shared`` holding the
small CLIP), offline. Their outcomes are then checked against independent computations.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Offline quickstart"
TOLERANCE = 1e-3


def quickstart_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block in the README's offline quickstart section."""
    text = README.read_text(encoding="utf-8")
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"README.md has no '{SECTION}' section"
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```(\w+)\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def bash_commands() -> list[str]:
    """The section's shell commands, one per line (continuation lines joined), comments and blanks left out."""
    commands = []
    for language, code in quickstart_blocks():
        if language != "bash":
            continue
        for line in code.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def python_blocks() -> list[str]:
    return [code for language, code in quickstart_blocks() if language == "python"]


def command_named(subcommand: str) -> str:
    matches = [command for command in bash_commands() if command.startswith(f"anomalib {subcommand} ")]
    assert len(matches) == 1, (subcommand, bash_commands())
    return matches[0]


def option(command: str, name: str) -> str:
    words = shlex.split(command)
    return words[words.index(name) + 1]


def test_quickstart_section_is_complete_and_needs_no_model_flags():
    """The section shows the whole path, and checkpoints are used as users would: no repeated --model.* flags."""
    commands = bash_commands()
    order = ["zero_shot", "train", "test", "predict", "export"]
    positions = [next(i for i, c in enumerate(commands) if c.startswith(f"anomalib {name} ")) for name in order]
    assert positions == sorted(positions), commands
    assert "--config configs/zero_shot/synthetic.yaml" in command_named("zero_shot")
    train_config = option(command_named("train"), "--config")
    assert (ROOT / train_config).is_file(), train_config
    for name in ("test", "predict", "export"):
        command = command_named(name)
        assert option(command, "--model") == "FAPrompt", command
        assert not [word for word in shlex.split(command) if word.startswith("--model.")], command
        assert option(command, "--ckpt_path").endswith(".ckpt"), command
    assert option(command_named("export"), "--export_type") == "openvino"
    [code] = python_blocks()
    assert "OpenVINOInferencer" in code and '"INFERENCE_PRECISION_HINT": "f32"' in code


def _new_files(folder: Path, pattern: str, since: float) -> list[Path]:
    return [path for path in folder.rglob(pattern) if path.is_file() and path.stat().st_mtime >= since]


@pytest.mark.slow
def test_offline_quickstart_runs_verbatim(tmp_path, monkeypatch, small_clip):
    shared = Path(small_clip["backbone"]).parents[1]
    workdir = tmp_path / "repo"
    workdir.mkdir()
    (workdir / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    (tmp_path / "shared").symlink_to(shared, target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "ANOMALIB_FAPROMPT_SHARED"}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this venv's python, anomalib
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }

    def run(command: list[str] | str) -> str:
        shell = isinstance(command, str)
        result = subprocess.run(
            command, shell=shell, executable="/bin/bash" if shell else None, cwd=workdir, env=env,
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"README command failed: {command}\n{output[-4000:]}"
        return output

    outputs, started = {}, {}
    for command in bash_commands():
        name = command.split()[1] if command.startswith("anomalib ") else command
        started[name] = time.time()
        outputs[name] = run(command)
    [code] = python_blocks()
    (tmp_path / "quickstart.py").write_text(code)
    inference_output = run([sys.executable, str(tmp_path / "quickstart.py")])

    # zero_shot: one row per model of the config and target category, in the table file of its results_dir.
    config = yaml.safe_load((ROOT / "configs" / "zero_shot" / "synthetic.yaml").read_text())
    table = workdir / config["results_dir"] / "results.csv"
    with table.open(newline="") as file:
        rows = list(csv.DictReader(file))
    expected = {
        (model["class_path"], category) for model in config["models"] for target in config["targets"]
        for category in target["categories"]
    }  # fmt: skip
    found = {(row["model"], row["category"]) for row in rows}
    assert expected <= found, (sorted(expected - found), rows)

    # test: the checkpoint alone brings back the trained model, so it scores the target as training's own test did.
    def metrics(output: str) -> dict[str, float]:
        return {name: float(value) for name, value in re.findall(r"│\s*(\w+_\w+)\s*│\s*([0-9.]+)\s*│", output)}

    tested, trained = metrics(outputs["test"]), metrics(outputs["train"])
    assert {"image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO"} <= tested.keys(), outputs["test"][-3000:]
    assert tested == pytest.approx(trained, abs=1e-6), (tested, trained)

    # predict: one heat-map overlay per input image.
    inputs = sorted(path.name for path in (workdir / option(command_named("predict"), "--data")).glob("*.png"))
    written = sorted(path.name for path in _new_files(workdir / "results", "*.png", started["predict"]))
    assert inputs and written == inputs, (inputs, written)

    # export + OpenVINOInferencer: the printed score is torch's on the same image; so is the whole map.
    xml = re.search(r'path="([^"]+\.xml)"', code).group(1)
    assert (workdir / xml).is_file() and (workdir / xml).stat().st_mtime >= started["export"], xml
    image = workdir / re.search(r'predict\("([^"]+)"\)', code).group(1)
    printed = float(re.search(r"score ([0-9.]+)", inference_output).group(1))

    from anomalib.data.utils import read_image
    from anomalib.deploy import OpenVINOInferencer

    from anomalib_faprompt import FAPrompt

    checkpoint = workdir / option(command_named("export"), "--ckpt_path")
    model = FAPrompt.load_from_checkpoint(checkpoint, **small_clip).eval()  # the settings of the train config
    with torch.no_grad():
        expected_output = model(read_image(image, as_tensor=True)[None])
    assert printed == pytest.approx(float(expected_output.pred_score), abs=TOLERANCE)
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes its compiled-model cache to ./openvino_cache
    inferencer = OpenVINOInferencer(path=workdir / xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    prediction = inferencer.predict(image)
    exported_map = np.asarray(prediction.anomaly_map).reshape(-1)
    assert np.abs(exported_map - expected_output.anomaly_map.numpy().reshape(-1)).max() < TOLERANCE
