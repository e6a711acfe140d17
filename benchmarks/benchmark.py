"""Speed and memory of AnomalyCLIP and FAPrompt, printed as JSON.

Per method: FLOPs per image, inference latency and throughput per batch size, one training step
(and the forward cost of the frozen vision encoder on the same batch), peak memory, and the
machine's measured matmul rate in the same run, so efficiency is a ratio measured in one run.

Examples:
    python benchmarks/benchmark.py --config small                      # CI: ViT-B-16 at 224, random weights
    python benchmarks/benchmark.py --config large --batch-sizes 1 8    # ViT-L-14-336 at 518 (the paper's)
    python benchmarks/benchmark.py --config large --device cuda --precision bf16 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from anomalib_faprompt import AnomalyCLIP, FAPrompt

CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"backbone": "ViT-B-16", "image_size": 224, "dpam_layers": 10, "feature_layers": (6, 12)},
    "large": {"backbone": "ViT-L-14-336", "image_size": 518, "dpam_layers": 19, "feature_layers": (6, 12, 18, 24)},
}
METHODS = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``function`` in seconds."""
    for _ in range(warmup):
        function()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured rate of a large square matrix product in the benchmark's precision."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 4, warmup=2)
    return 2 * size**3 / seconds / 1e9


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(method: str, config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    settings = {k: v for k, v in config.items() if k != "feature_layers" or method == "AnomalyCLIP"}
    module = METHODS[method](
        **settings,
        pretrained=None,
        allow_untrained_prompts=True,
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    return module.to(device)


def benchmark_method(
    method: str, config: dict[str, Any], args: argparse.Namespace, device: torch.device, rate: float
) -> dict[str, Any]:
    torch.manual_seed(0)
    module = build(method, config, device)
    model = module.model
    size = config["image_size"]
    autocast: Callable[[], AbstractContextManager] = (
        (lambda: torch.autocast(device.type, dtype=DTYPES[args.precision]))
        if args.precision != "fp32"
        else nullcontext
    )

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, device=device)

    model.eval()
    # Count with the math attention backend: the flop counter does not see every fused kernel (CPU's).
    with torch.no_grad(), autocast(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            model(images(1))
        flops_per_image = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.encode_image(images(1), model.feature_layers)
        vision_flops_per_image = counter.get_total_flops()

    result: dict[str, Any] = {
        "method": method,
        "gflops_per_image": flops_per_image / 1e9,
        "vision_gflops_per_image": vision_flops_per_image / 1e9,
        "inference": {},
    }
    for batch in args.batch_sizes:
        batch_images = images(batch)
        reset_peak(device)
        with torch.no_grad(), autocast():
            seconds = timed(lambda batch_images=batch_images: model(batch_images), device, args.repeats, args.warmup)
        images_per_second = batch / seconds
        result["inference"][f"batch_{batch}"] = {
            "seconds_per_batch": seconds,
            "seconds_per_image": seconds / batch,
            "images_per_second": images_per_second,
            "efficiency_vs_matmul": flops_per_image * images_per_second / (rate * 1e9),
            "peak_memory_mb": peak_memory_mb(device),
        }

    batch = args.train_batch_size
    batch_images = images(batch)
    masks = torch.zeros(batch, size, size, device=device)
    masks[: batch // 2, size // 4 : size // 2, size // 4 : size // 2] = 1
    labels = (masks.flatten(1).amax(dim=1) > 0).long()
    optimiser = module.configure_optimizers()
    model.train()

    def training_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast():
            losses = module.training_losses(batch_images, masks, labels)
        losses["loss"].backward()
        optimiser.step()

    reset_peak(device)
    step_seconds = timed(training_step, device, args.repeats, args.warmup)
    train_peak = peak_memory_mb(device)
    with torch.no_grad(), autocast():
        vision_seconds = timed(
            lambda: model.encode_image(batch_images, model.feature_layers), device, args.repeats, args.warmup
        )
    result["training_step"] = {
        "batch_size": batch,
        "seconds": step_seconds,
        "vision_forward_seconds": vision_seconds,
        "step_over_vision_forward": step_seconds / vision_seconds,
        "peak_memory_mb": train_peak,
    }
    if args.precision != "fp32":
        result["score_difference_vs_fp32"] = precision_difference(model, images(4), autocast)
    return result


def precision_difference(model: torch.nn.Module, batch_images: torch.Tensor, autocast: Callable) -> dict[str, float]:
    """Largest score and map difference between the chosen precision and fp32 on the same images."""
    model.eval()
    with torch.no_grad():
        reference = model(batch_images)
        with autocast():
            mixed = model(batch_images)
    return {
        "max_abs_score": (mixed.pred_score - reference.pred_score).abs().max().item(),
        "max_abs_map": (mixed.anomaly_map - reference.anomaly_map).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    config = CONFIGS[args.config]
    rate = matmul_gflops(device, DTYPES[args.precision] if device.type == "cuda" else torch.float32)
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "matmul_gflops": rate,
        },
        "config": {"name": args.config, **config, "precision": args.precision, "pretrained": None},
        "results": [benchmark_method(method, config, args, device, rate) for method in args.methods],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
