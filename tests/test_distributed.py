"""DDP over two CPU processes (gloo) learns the prompts and computes the metrics of one process.

Each method is fitted and tested by ``distributed_run.py`` twice, in subprocesses (Lightning's DDP on CPU starts its
other process by running the command line again): in one process with a batch of 4, and in two with 2 each, on the
same synthetic data and seed. The target's test split has 7 images, so the shards of the test differ in size.
``anomalib zero_shot`` runs the same way with ``devices: 2``. The samplers and the refusals are checked in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import DataLoader, DistributedSampler

from anomalib_faprompt.data import generate_synthetic_dataset
from anomalib_faprompt.distributed import _check_unrepeated, _evaluation_loader, _training_loader
from anomalib_faprompt.pipelines import ZeroShot
from conftest import golden_path

SCRIPT = Path(__file__).with_name("distributed_run.py")
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO", "image_F1Score")
PAPER_METRICS = METRICS[:4]


# The samplers --------------------------------------------------------------------------------------------------------


def small_clip_settings() -> dict[str, str]:
    """The small random CLIP of ``shared/golden`` (the fixture ``small_clip`` without its image size)."""
    return {"backbone": str(golden_path("clip_small.json")), "pretrained": str(golden_path("clip_small_seed0.pt"))}


def batches(loader: DataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_process_draws_the_global_batches_of_two(shuffle, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    images = list(range(12))
    one = _training_loader(DataLoader(images, batch_size=4, shuffle=shuffle), num_replicas=1, rank=0)
    two = [_training_loader(DataLoader(images, batch_size=2, shuffle=shuffle), 2, rank) for rank in (0, 1)]
    assert isinstance(one.sampler, DistributedSampler) and one.sampler.seed == 7
    for epoch in (0, 1):
        global_batches = [sorted(a + b) for a, b in zip(batches(two[0], epoch), batches(two[1], epoch), strict=True)]
        assert global_batches == [sorted(batch) for batch in batches(one, epoch)]
        assert sorted(index for batch in global_batches for index in batch) == images
    order = [index for batch in batches(one, 1) for index in batch]
    assert (order != images) == shuffle  # a shuffled loader stays shuffled (by epoch), an ordered one in order
    assert batches(one, 0) != batches(one, 1) or not shuffle


def test_evaluation_shards_hold_each_image_once():
    images = list(range(7))
    loader = DataLoader(images, batch_size=2)
    assert _evaluation_loader(loader, num_replicas=1, rank=0) is loader  # one process: unchanged
    shards = [[i for batch in _evaluation_loader(loader, 2, rank) for i in batch.tolist()] for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    with pytest.raises(ValueError, match="3 processes"):
        _evaluation_loader(DataLoader([0, 1], batch_size=2), num_replicas=3, rank=0)


def test_evaluation_refuses_shards_padded_with_repeated_images():
    padded = DataLoader(list(range(7)), sampler=DistributedSampler(list(range(7)), num_replicas=2, rank=1))
    with pytest.raises(RuntimeError, match="1 repeated image"):
        _check_unrepeated([padded], "test")
    _check_unrepeated({"target": _evaluation_loader(DataLoader(list(range(7))), 2, 1)}, "test")
    _check_unrepeated(DataLoader(list(range(8)), sampler=DistributedSampler(list(range(8)), 2, 1)), "test")


# Fit and test: one process against two -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Auxiliary category ``stripes`` (8 labelled images) and target ``disc`` with 7 test images (3 normal)."""
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("data"), categories=["stripes", "disc"], n_train=2, n_test=4, image_size=64
    )
    (root / "disc" / "test" / "good" / "000.png").unlink()
    return root


def run_command(command: list[str], devices: int) -> subprocess.CompletedProcess:
    # One thread per process: two processes on a CI machine's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if devices > 1 else None
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def run(method: str, data: Path, out: Path, devices: int, batch_size: int) -> dict[str, Any]:
    """Fit and test in ``devices`` processes; what rank 0 wrote, and what each process scored."""
    command = [sys.executable, str(SCRIPT), "--method", method, "--root", str(data), "--out", str(out),
               "--devices", str(devices), "--batch-size", str(batch_size)]  # fmt: skip
    run_command(command, devices)
    scored = [json.loads((out / f"scored-rank{rank}.json").read_text()) for rank in range(devices)]
    return {
        "prompts": torch.load(out / "prompts.pt", weights_only=True),
        **json.loads((out / "metrics.json").read_text()),
        "scored": scored,
    }


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Any:
    """``one_process(method)``: the method's run in one process with a batch of 4 (run once per module)."""
    done: dict[str, dict[str, Any]] = {}

    def get(method: str) -> dict[str, Any]:
        if method not in done:
            done[method] = run(method, data, tmp_path_factory.mktemp(method), devices=1, batch_size=4)
        return done[method]

    return get


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Any:
    """``two_processes(method)``: the method's run in two processes with a batch of 2 each (run once per module)."""
    done: dict[str, dict[str, Any]] = {}

    def get(method: str) -> dict[str, Any]:
        if method not in done:
            folder = tmp_path_factory.mktemp(method)
            done[method] = run(method, data, folder, devices=2, batch_size=2)
            done[method]["results"] = folder / "results" / method / "MVTecAD" / "disc"
        return done[method]

    return get


@pytest.fixture(scope="module", params=["AnomalyCLIP", "FAPrompt", "PromptAD"])
def runs(request, one_process, two_processes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The runs of one method in one process (batch 4) and in two (batch 2 each)."""
    return one_process(request.param), two_processes(request.param)


def rounding_level_elements(one: dict[str, Any], two: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per learned parameter, the elements whose gradient was at the rounding level of the batch sum in some step.

    One process sums a gradient over the whole batch, DDP over each process's half and then across processes:
    the same sum in another order, equal within float rounding. Where an element's true gradient is about that
    rounding (a sum of terms that cancel), the two values differ by a sizeable fraction of themselves, and Adam,
    which divides each element by its own magnitude (``g / (|g| + eps)`` in a first step), turns that into updates
    that differ by up to the learning rate (FAPrompt on these data: one element of ``prior.0.weight`` with
    1.5e-8 against 1.7e-8 at a gradient scale of 0.09, 2.7e-5 apart afterwards). Those elements are decided by
    rounding in any summation order; they are the ones where the two runs' gradients differ by more than 0.1 %.
    """
    masks = {name: torch.zeros_like(value, dtype=torch.bool) for name, value in one["prompts"]["learned"].items()}
    for a, b in zip(one["prompts"]["gradients"], two["prompts"]["gradients"], strict=True):
        for name in a:
            masks[name] |= (b[name] - a[name]).abs() > 1e-3 * (a[name].abs() + 1e-8)
    return masks


def assert_learned_as_one_process(learned: dict[str, torch.Tensor], one: dict[str, Any], two: dict[str, Any]) -> None:
    """``learned`` equals one process's learned values within 1e-5 but where the gradient was at rounding level."""
    decided_by_rounding = rounding_level_elements(one, two)
    for name, value in one["prompts"]["learned"].items():
        kept = ~decided_by_rounding[name]
        torch.testing.assert_close(learned[name][kept], value[kept], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_two_processes_learn_the_prompts_of_one(runs):
    one, two = runs
    learned, initial = one["prompts"]["learned"], one["prompts"]["initial"]
    assert learned and learned.keys() == two["prompts"]["learned"].keys()
    # Each optimiser step applies the gradients of one process's global batch: DDP's average of the halves.
    steps = list(zip(one["prompts"]["gradients"], two["prompts"]["gradients"], strict=True))
    assert len(steps) >= 2  # 8 auxiliary images in global batches of 4 (PromptAD: one step per epoch, 3 epochs)
    for gradients_one, gradients_two in steps:
        assert gradients_one.keys() == gradients_two.keys() and set(gradients_one) <= set(learned)
        for name, gradient in gradients_one.items():
            scale = float(gradient.abs().max())
            assert scale > 0, name
            torch.testing.assert_close(gradients_two[name], gradient, atol=1e-5 * scale, rtol=0, msg=name)
    # The learned values then agree within 1e-5, but for the few elements whose gradient was rounding (see
    # rounding_level_elements; measured: 13 of 7,168 for AnomalyCLIP, 51 of 120,144 for FAPrompt, with gradients
    # under 1e-3 of their parameter's largest; all but one of them agree within 1e-7 anyway).
    decided_by_rounding = sum(int(mask.sum()) for mask in rounding_level_elements(one, two).values())
    assert decided_by_rounding <= 0.01 * sum(value.numel() for value in learned.values())
    for name, value in learned.items():
        # Learning moved every parameter far beyond the tolerance, so agreeing is not agreeing on the start.
        assert (value - initial[name]).abs().max() > 1e-4, name
    assert_learned_as_one_process(two["prompts"]["learned"], one, two)


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(runs):
    one, two = runs
    for name in METRICS:
        assert two["metrics"][name] == pytest.approx(one["metrics"][name], abs=1e-6), name
    # Thresholds and normalisation come from the validation split, sharded too.
    for name, value in one["post_processor"].items():
        assert two["post_processor"][name] == pytest.approx(value, abs=2e-6), name


@pytest.mark.slow
def test_the_sharded_test_scores_each_image_once(runs, data):
    one, two = runs
    images = sorted(str(path) for path in (data / "disc" / "test").rglob("*.png"))
    assert len(images) == 7
    assert sorted(one["scored"][0]["paths"]) == images
    shards = [shard["paths"] for shard in two["scored"]]
    assert sorted(len(paths) for paths in shards) == [3, 4]
    assert sorted(path for paths in shards for path in paths) == images
    assert {shard["sampler"] for shard in two["scored"]} == {"UnrepeatedDistributedSamplerWrapper"}


@pytest.mark.slow
def test_the_metrics_count_each_image_once(runs):
    """The reported image metrics are those of the 7 scores; Lightning's padding of the shards would change them."""
    _, two = runs
    scores = {
        path: score for shard in two["scored"] for path, score in zip(shard["paths"], shard["scores"], strict=True)
    }
    paths = sorted(scores)
    labels = [int("/good/" not in path) for path in paths]
    values = [scores[path] for path in paths]
    assert roc_auc_score(labels, values) == pytest.approx(two["metrics"]["image_AUROC"], abs=1e-6)
    assert average_precision_score(labels, values) == pytest.approx(two["metrics"]["image_AP"], abs=1e-6)
    # Lightning's DistributedSampler pads 7 images to 8 by repeating the first one of the split.
    first = two["scored"][0]["paths"][0]
    padded = ([*labels, labels[paths.index(first)]], [*values, scores[first]])
    changed = [
        roc_auc_score(*padded) != pytest.approx(two["metrics"]["image_AUROC"], abs=1e-6),
        average_precision_score(*padded) != pytest.approx(two["metrics"]["image_AP"], abs=1e-6),
    ]
    assert any(changed)


@pytest.mark.slow
def test_the_processes_write_into_rank_zeros_folder(runs):
    """anomalib's Engine made a version folder per process; the heat-maps and checkpoint are all in rank 0's."""
    _, two = runs
    assert sorted(path.name for path in two["results"].iterdir()) == ["latest", "v0"]
    latest = two["results"] / "latest"
    assert latest.resolve() == two["results"] / "v0"
    assert len(list((latest / "images").rglob("*.png"))) == 7
    assert (latest / "weights" / "lightning" / "model.ckpt").is_file()


# The anomalib CLI -----------------------------------------------------------------------------------------------------


def printed_metrics(output: str) -> dict[str, float]:
    """The metrics of the table ``anomalib train`` and ``test`` print."""
    return {name: float(value) for name, value in re.findall(r"│\s*(\w+)\s*│\s*([0-9.]+)\s*│", output)}


@pytest.mark.slow
def test_anomalib_train_and_test_over_two_processes_give_one_process_results(
    data, tmp_path, one_process, two_processes
):
    """``anomalib train`` and ``anomalib test`` with ``--trainer.strategy ddp --trainer.devices 2``."""
    one, two = one_process("FAPrompt"), two_processes("FAPrompt")
    clip = {**small_clip_settings(), "image_size": 112, "dpam_layers": 6}
    mvtec = "anomalib.data.MVTecAD"
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False},
        "default_root_dir": str(tmp_path / "results"),
        "model": {"class_path": "FAPrompt", "init_args": clip},
        "data": {"class_path": "anomalib_faprompt.data.AuxiliaryDataModule", "init_args": {
            "num_workers": 0, "train_batch_size": 2, "eval_batch_size": 2,
            "auxiliary": [{"class_path": mvtec, "init_args": {"root": str(data), "category": "stripes"}}],
            "target": {"class_path": mvtec, "init_args": {"root": str(data), "category": "disc"}},
        }},
    }  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    train = run_command([ANOMALIB, "train", "--config", str(tmp_path / "train.yaml"), *ddp], devices=2)
    assert "GLOBAL_RANK: 1" in train.stdout + train.stderr
    # The prompts and metrics of one process with twice the batch (seed_everything seeds the initial prompts):
    # the arithmetic of Engine's two processes exactly, so one process's values as that test bounds them.
    prompts = tmp_path / "results" / "FAPrompt" / "MVTecAD" / "disc" / "latest" / "weights" / "lightning" / "prompts.pt"
    learned = torch.load(prompts, weights_only=True)["state_dict"]
    for name, value in two["prompts"]["learned"].items():
        torch.testing.assert_close(learned[name], value, atol=1e-7, rtol=0, msg=name)
    assert_learned_as_one_process(learned, one, two)
    trained = printed_metrics(train.stdout)
    for name in METRICS:
        assert trained[name] == pytest.approx(one["metrics"][name], abs=1e-6), name
    # Testing the saved prompts validates (thresholds) and tests over two processes: the same table.
    model = ["--model", "FAPrompt", *(f"--model.{key}={value}" for key, value in clip.items()),
             "--model.prompt_weights", str(prompts)]  # fmt: skip
    target = ["--data", "MVTecAD", "--data.root", str(data), "--data.category", "disc", "--data.num_workers", "0",
              "--data.eval_batch_size", "2"]  # fmt: skip
    root = ["--default_root_dir", str(tmp_path / "test")]
    tested = printed_metrics(run_command([ANOMALIB, "test", *model, *target, *ddp, *root], devices=2).stdout)
    for name in METRICS:
        assert tested[name] == pytest.approx(trained[name], abs=1e-6), name


# anomalib zero_shot ---------------------------------------------------------------------------------------------------


def zero_shot_config(data: Path, results: Path, devices: int, models: list[dict] | None = None) -> dict[str, Any]:
    clip = {**small_clip_settings(), "image_size": 112, "dpam_layers": 6}
    dataset = {"class_path": "MVTecAD", "init_args": {"root": str(data)}}
    return {
        "seed": 0, "accelerator": "cpu", "devices": devices, "max_epochs": 1, "train_batch_size": 4,
        "eval_batch_size": 2, "num_workers": 0, "results_dir": str(results),
        "auxiliary": {"dataset": dataset, "categories": ["stripes"]},
        "targets": [{"dataset": dataset, "categories": ["disc"]}],
        "models": models or [{"class_path": "FAPrompt", "init_args": clip}],
    }  # fmt: skip


@pytest.mark.slow
def test_zero_shot_over_two_processes_writes_once_the_results_of_one(data, tmp_path, one_process, two_processes):
    one = ZeroShot().run_config(zero_shot_config(data, tmp_path / "one", devices=1))
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(zero_shot_config(data, tmp_path / "two", devices=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([ANOMALIB, "zero_shot", "--config", str(config)], capture_output=True, text=True,
                            timeout=600, check=False, env=env)  # fmt: skip
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.count("Zero-shot results") == 1  # rank 1 ran the pipeline too, but printed nothing
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr
    two = pd.read_csv(tmp_path / "two" / "results.csv")
    for name in PAPER_METRICS:
        assert two[name].tolist() == pytest.approx(one[name].tolist(), abs=1e-6), name
    # The same settings fingerprint (devices is not among them), the same prompts: each run does the arithmetic of
    # Engine's run in as many processes, whose prompts the test above compares.
    [prompts_one] = (tmp_path / "one").glob("FAPrompt/*/prompts.pt")
    prompts_two = tmp_path / "two" / prompts_one.relative_to(tmp_path / "one")
    learned = [torch.load(path, weights_only=True)["state_dict"] for path in (prompts_one, prompts_two)]
    engine_runs = (one_process("FAPrompt"), two_processes("FAPrompt"))
    for pipeline, engine in zip(learned, engine_runs, strict=True):
        for name, value in engine["prompts"]["learned"].items():
            torch.testing.assert_close(pipeline[name], value, atol=1e-7, rtol=0, msg=name)
    assert_learned_as_one_process(learned[1], *engine_runs)
    folder = prompts_two.parent
    assert len(list((folder / "rows").glob("*.json"))) == 1
    assert len(list((folder / "MVTecAD" / "disc" / "images").rglob("*.png"))) == 7  # each test image once
    assert not list((tmp_path / "two").rglob("*.tmp-*"))


def test_zero_shot_refuses_over_several_processes_what_would_differ(data, tmp_path):
    config = zero_shot_config(data, tmp_path / "results", devices=2)
    with pytest.raises(ValueError, match=r"train_batch_size 3 .* multiple of 2"):
        ZeroShot().run_config(config | {"train_batch_size": 3})
    with pytest.raises(ValueError, match="strategy 'ddp_spawn'"):
        ZeroShot().run_config(config | {"strategy": "ddp_spawn"})
    patchcore = {"class_path": "Patchcore", "init_args": {"backbone": "resnet18", "pre_trained": False}}
    with pytest.raises(ValueError, match=r"models\[1\] \(Patchcore\) .* devices: 1"):
        ZeroShot().run_config(config | {"models": [*config["models"], patchcore]})
    assert not (tmp_path / "results").exists()  # refused before any work, no folder left behind


def test_anomalib_zero_shot_refuses_a_bad_config_in_one_line(data, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(zero_shot_config(data, tmp_path / "results", devices=2) | {"train_batch_size": 3}))
    result = subprocess.run([ANOMALIB, "zero_shot", "--config", str(config)], capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith("error: train_batch_size 3 is the global batch of prompt learning")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
