"""The benchmark runs on the small configuration and reports every figure (no timing asserts)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_faprompt.methods import METHODS, Learning

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


@pytest.mark.slow
def test_benchmark_reports_latency_training_memory_and_efficiency():
    command = [sys.executable, str(SCRIPT), "--config", "small", "--batch-sizes", "1", "2",
               "--train-batch-size", "2", "--repeats", "1", "--warmup", "0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["machine"]["matmul_gflops"] > 0
    assert {entry["method"] for entry in report["results"]} == set(METHODS)
    for entry in report["results"]:
        assert entry["gflops_per_image"] > entry["vision_gflops_per_image"] > 0
        for batch in ("batch_1", "batch_2"):
            figures = entry["inference"][batch]
            assert figures["seconds_per_image"] > 0
            assert figures["images_per_second"] > 0
            assert figures["efficiency_vs_matmul"] > 0
            assert figures["peak_memory_mb"] > 0
        training = entry["training_step"]
        assert training["seconds"] > 0 and training["vision_forward_seconds"] > 0
        ratio = training["seconds"] / training["vision_forward_seconds"]
        assert training["step_over_vision_forward"] == pytest.approx(ratio)


@pytest.mark.slow
def test_benchmark_reports_compiled_latency_and_the_engine_against_the_model_alone():
    command = [sys.executable, str(SCRIPT), "--config", "small", "--methods", "AnomalyCLIP", "--batch-sizes", "1", "2",
               "--train-batch-size", "2", "--repeats", "1", "--warmup", "0", "--inference-compile", "default",
               "--end-to-end", "4", "--end-to-end-image-size", "300", "--num-workers", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(result.stdout)["results"]
    compiled = entry["inference_compiled"]
    assert compiled["mode"] == "default"
    for batch in ("batch_1", "batch_2"):
        eager, ours = entry["inference"][batch], compiled[batch]
        assert ours["speedup_vs_eager"] == pytest.approx(eager["seconds_per_batch"] / ours["seconds_per_batch"])
        assert ours["warmup_seconds"] > ours["seconds_per_batch"] > 0  # the first call compiled
    assert set(compiled["warmup_seconds_per_input"]) == {"(1, 3, 224, 224)", "(2, 3, 224, 224)"}
    end_to_end = entry["end_to_end"]
    assert end_to_end["images"] == 4 and end_to_end["batch_size"] == 2 and end_to_end["image_size"] == 300
    assert end_to_end["engine_images_per_second"] == pytest.approx(4 / end_to_end["engine_seconds"])
    assert end_to_end["model_images_per_second"] == compiled["batch_2"]["images_per_second"]
    assert end_to_end["engine_over_model"] == pytest.approx(
        end_to_end["engine_images_per_second"] / end_to_end["model_images_per_second"]
    )


@pytest.mark.slow
def test_export_benchmark_reports_parity_and_latency_of_every_backend():
    """ViT-B/16 layout (not the fixtures' small CLIP): FAPrompt's DAP path exported and within 1e-3 of torch.

    OpenVINO runs in f32 whatever the CPU's default (bf16 on CPUs with AVX512-BF16 or AMX), and says so.
    """
    script = SCRIPT.with_name("export.py")
    command = [sys.executable, str(script), "--methods", "FAPrompt", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["config"]["openvino_precision_requested"] == "f32"
    assert report["machine"]["openvino_cpu_default_precision"] in {"f32", "bf16", "f16"}
    (entry,) = report["results"]
    assert entry["openvino_inference_precision"] == "f32"
    assert set(entry["seconds_per_image"]) == {"torch", "onnxruntime", "openvino"}
    assert all(seconds > 0 for seconds in entry["seconds_per_image"].values())
    for backend in ("onnxruntime", "openvino"):
        assert entry["export_seconds"]["onnx" if backend == "onnxruntime" else "openvino"] > 0
        assert max(entry["max_difference_vs_torch"][backend].values()) < 1e-3, entry["max_difference_vs_torch"]
        assert entry["speedup_vs_torch"][backend] == pytest.approx(
            entry["seconds_per_image"]["torch"] / entry["seconds_per_image"][backend]
        )


@pytest.mark.slow
def test_few_shot_benchmark_reports_linear_memory_and_latency_ratios():
    """ViT-B/16 at 224: memory bytes equal layers × k × patches × embedding width × 4, latency as ratios to k = 0."""
    import open_clip

    command = [sys.executable, str(SCRIPT.with_name("few_shot.py")), "--config", "small", "--ks", "0", "1", "2",
               "--repeats", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    width = open_clip.get_model_config("ViT-B-16")["embed_dim"]
    zero_shot = {name for name, method in METHODS.items() if Learning.ZERO_SHOT in method.load().learning_types}
    assert {entry["method"] for entry in report["results"]} == zero_shot  # PromptAD needs k >= 1: benchmark.py
    for entry in report["results"]:
        # The small config's feature_layers (6, 12) where the method takes them, else its last layer.
        layers = 2 if "feature_layers" in inspect.signature(METHODS[entry["method"]].load()).parameters else 1
        per_k = entry["per_k"]
        for k in (0, 1, 2):
            figures = per_k[f"k_{k}"]
            assert figures["memory_bytes"] == layers * k * (224 // 16) ** 2 * width * 4
            assert figures["latency_over_k0"] == pytest.approx(
                figures["seconds_per_image"] / per_k["k_0"]["seconds_per_image"]
            )
        assert entry["bytes_per_reference"] == per_k["k_1"]["memory_bytes"]
        assert entry["add_reference_seconds"] > 0
        assert all(per_k[f"k_{k}"]["seconds_per_image_runs"] for k in (0, 1, 2))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--end-to-end", "1"], "even number of images, at least 2"),
        (["--end-to-end", "5"], "even number of images, at least 2"),
        (["--end-to-end", "4", "--end-to-end-batch-size", "3"], "must be one of --batch-sizes [1, 2]"),
    ],
)
def test_end_to_end_settings_are_refused_before_anything_is_measured(arguments, message):
    command = [sys.executable, str(SCRIPT), "--batch-sizes", "1", "2", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr
