"""anomalib's own CLI runs our models: a train config with auxiliary data, and ``anomalib benchmark``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from anomalib_faprompt.data import generate_synthetic_dataset

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=cwd)


@pytest.mark.slow
def test_train_config_with_auxiliary_datamodule_runs_end_to_end(tmp_path, small_clip):
    root = generate_synthetic_dataset(tmp_path / "data", categories=["stripes", "grain", "disc"], n_train=2, n_test=4)
    mvtec = "anomalib.data.MVTecAD"
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu"},
        "default_root_dir": str(tmp_path / "results"),
        "model": {"class_path": "FAPrompt", "init_args": small_clip},
        "data": {
            "class_path": "anomalib_faprompt.data.AuxiliaryDataModule",
            "init_args": {
                "num_workers": 0,
                "train_batch_size": 4,
                "auxiliary": [
                    {"class_path": mvtec, "init_args": {"root": str(root), "category": category, "num_workers": 0}}
                    for category in ("stripes", "grain")
                ],
                "target": {"class_path": mvtec, "init_args": {"root": str(root), "category": "disc", "num_workers": 0}},
            },
        },
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run([ANOMALIB, "train", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "image_AUROC" in result.stdout + result.stderr
    prompt_files = list((tmp_path / "results").rglob("prompts.pt"))
    assert prompt_files, "no prompt file next to the checkpoint"
    checkpoint_dirs = {path.parent for path in (tmp_path / "results").rglob("*.ckpt")}
    assert {path.parent for path in prompt_files} & checkpoint_dirs


@pytest.mark.slow
def test_anomalib_benchmark_runs_faprompt(tmp_path, small_clip, tiny_mvtec):
    category = {"class_path": "MVTecAD", "init_args": {"root": str(tiny_mvtec), "category": "widget", "num_workers": 0}}
    config = {
        "accelerator": ["cpu"],
        "benchmark": {
            "seed": 42,
            "model": {"class_path": "FAPrompt", "init_args": {**small_clip, "max_epochs": 1}},
            "data": {
                "class_path": "AuxiliaryDataModule",
                "init_args": {"auxiliary": [category], "target": category, "num_workers": 0},
            },
        },
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run([ANOMALIB, "benchmark", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "There were some errors" not in result.stdout, (tmp_path / "runs" / "pipeline.log").read_text()[-4000:]
    (csv,) = (tmp_path / "runs" / "benchmark").rglob("results.csv")
    row = pd.read_csv(csv).iloc[0]
    assert "FAPrompt" in row.to_dict().values()
    assert 0 <= row["image_AUROC"] <= 1
