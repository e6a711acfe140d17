"""Speed and memory of every method of the method list, printed as JSON.

Per method: FLOPs per image, inference latency and throughput per batch size, one training step
(and the forward cost of the frozen vision encoder on the same batch), peak memory, and the
machine's measured matmul rate in the same run, so efficiency is a ratio measured in one run.

Weights are random (``pretrained=None``): speed does not depend on them. FLOPs are counted with
:class:`torch.utils.flop_counter.FlopCounterMode` on one image with the static text already cached
(steady-state inference), attention counted through the math backend. Methods that score against k normal
images (PromptAD) get ``--k-shot`` random references first; their training step is one step on those k
shots (their features encoded once beforehand, as a fit does), the others' a step on a labelled batch. Efficiency is
``FLOPs/image × images/s ÷ measured matmul FLOP/s``, all from the same run. Peak memory is the
allocator's peak on CUDA and the process's peak resident set size (sampled) on CPU, weights included.

``--inference-compile MODE`` also times every batch size with the model setting ``inference_compile=MODE``
(``reduce-overhead``: CUDA graphs on GPUs), each with its warm-up (compilation) and speed-up over eager.
``--end-to-end N`` also times ``Engine.test`` on N full-size PNG images (decode, transfer, resize on the
device, model, post-processing, metrics) against the model alone at the same batch size.

Examples:
    python benchmarks/benchmark.py --config small                      # CI: ViT-B-16 at 224 (~2-4 min, 2 cores)
    python benchmarks/benchmark.py --config large                      # ViT-L-14-336 at 518 (~5-8 min, 2 cores)
    python benchmarks/benchmark.py --config large --device cuda --precision bf16 --batch-sizes 1 8 32
    python benchmarks/benchmark.py --config large --device cuda --precision bf16 --batch-sizes 1 32 \\
        --inference-compile reduce-overhead --end-to-end 256            # batch-1 latency, compiled, engine
    python benchmarks/benchmark.py --config base512 --batch-sizes 1 8  # CPU batching at ViT-B/16, 512 px

On CPU the large configuration defaults to one timed repeat, no warm-up and a training batch of 2,
so that it finishes in under 10 minutes on 2 cores; pass ``--repeats``/``--warmup``/
``--train-batch-size`` to override.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from end_to_end import CATEGORY, end_to_end
from measure import METHODS, PeakMemory, accepted_settings, emit, machine, synchronise, timed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from anomalib_faprompt.clip.compiled import COMPILE_MODES
from anomalib_faprompt.methods import Learning
from anomalib_faprompt.models.training_rules import NoPromptLearning, NormalFewShotPromptLearning

#: Model settings per configuration (the paper's are ``large``).
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"backbone": "ViT-B-16", "image_size": 224, "dpam_layers": 10, "feature_layers": (6, 12)},
    "large": {"backbone": "ViT-L-14-336", "image_size": 518, "dpam_layers": 19, "feature_layers": (6, 12, 18, 24)},
    # The CPU batching check at ViT-B/16 (batch 8 must cost per image what batch 1 does).
    "base512": {"backbone": "ViT-B-16", "image_size": 512, "dpam_layers": 10, "feature_layers": (6, 12)},
    # PromptAD's released backbone and size (the others with the small config's layers).
    "promptad": {"backbone": "ViT-B-16-plus-240", "image_size": 240, "dpam_layers": 10, "feature_layers": (6, 12)},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Timing defaults: (repeats, warm-up runs, training batch) per (config, device type).
TIMING_DEFAULTS: dict[tuple[str, str], tuple[int, int, int]] = {("large", "cpu"): (1, 0, 2)}
DEFAULT_TIMING = (3, 1, 8)


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured rate of a large square matrix product, the reference for efficiency.

    Args:
        device: Device to measure.
        dtype: Element type of the product (the benchmark's precision on GPU, fp32 on CPU).

    Returns:
        GFLOP/s of the best of several products (``2 n³`` FLOPs each).
    """
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronise(device)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 5):
        start = time.perf_counter()
        a @ b
        synchronise(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def build(method: str, config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """Lightning module of ``method`` with random CLIP weights and untrained prompts.

    Args:
        method: A method's short name (a key of :data:`METHODS`).
        config: One of :data:`CONFIGS`.
        device: Where to put it.

    Returns:
        The module, without pre/post-processing, on ``device``.
    """
    settings = accepted_settings(METHODS[method], {**config, "category": CATEGORY})
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
    """FLOPs, inference latency/throughput/memory per batch size, and one training step of a method.

    Args:
        method: A method's short name (a key of :data:`METHODS`).
        config: One of :data:`CONFIGS`.
        args: Parsed command line (batch sizes, precision, repeats, ...).
        device: Device to run on.
        rate: Measured matmul GFLOP/s of ``device`` in this run.

    Returns:
        The method's entry of the JSON report.
    """
    torch.manual_seed(0)
    module = build(method, config, device)
    model = module.model
    size = config["image_size"]
    autocast: Callable[[], AbstractContextManager] = (
        (lambda: torch.autocast(device.type, dtype=DTYPES[args.precision])) if args.precision != "fp32" else nullcontext
    )

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, device=device)

    shots = images(args.k_shot)
    if Learning.FEW_SHOT_PROMPTS in METHODS[method].learning_types:
        model.add_references(shots)  # it scores against the visual memory of k normal images
    model.eval()
    result: dict[str, Any] = {"method": method, **flop_counts(model, images, autocast)}
    result["inference"] = {
        f"batch_{batch}": inference_figures(model, images(batch), result["gflops_per_image"], rate, autocast, args)
        for batch in args.batch_sizes
    }
    if args.inference_compile:
        result["inference_compiled"] = compiled_figures(model, images, result, rate, autocast, args)
    if args.end_to_end:
        result["end_to_end"] = end_to_end(method, config, args, device, result)
    if not args.no_training and not isinstance(module.training_rule, NoPromptLearning):
        result["training_step"] = training_figures(module, images, shots, autocast, args)
    return result | precision_figures(model, images, autocast, args)


def flop_counts(
    model: torch.nn.Module, images: Callable[[int], torch.Tensor], autocast: Callable[[], AbstractContextManager]
) -> dict[str, float]:
    """GFLOPs per image of the whole model and of its vision encoder, static text cached (steady-state inference).

    Counted with the math attention backend: the flop counter does not see every fused kernel (CPU's).
    """
    with torch.no_grad(), autocast(), sdpa_kernel(SDPBackend.MATH):
        model(images(1))  # caches the static text, which inference encodes once, not per image
        with FlopCounterMode(display=False) as counter:
            model(images(1))
        flops_per_image = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.encode_image(images(1), model.feature_layers)
        vision_flops_per_image = counter.get_total_flops()
    return {"gflops_per_image": flops_per_image / 1e9, "vision_gflops_per_image": vision_flops_per_image / 1e9}


def inference_figures(
    model: torch.nn.Module,
    batch_images: torch.Tensor,
    gflops_per_image: float,
    rate: float,
    autocast: Callable[[], AbstractContextManager],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Latency, throughput, achieved GFLOP/s, efficiency against the matmul rate and peak memory of one batch."""
    device, batch = batch_images.device, batch_images.shape[0]
    with torch.no_grad(), autocast(), PeakMemory(device) as peak:
        seconds = timed(lambda: model(batch_images), device, args.repeats, args.warmup)
    images_per_second = batch / seconds
    return {
        "seconds_per_batch": seconds,
        "seconds_per_image": seconds / batch,
        "images_per_second": images_per_second,
        "achieved_gflops": gflops_per_image * images_per_second,
        "efficiency_vs_matmul": gflops_per_image * images_per_second / rate,
        "peak_memory_mb": peak.megabytes,
    }


def compiled_figures(
    model: torch.nn.Module,
    images: Callable[[int], torch.Tensor],
    result: dict[str, Any],
    rate: float,
    autocast: Callable[[], AbstractContextManager],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every batch size again with the model setting users set (``inference_compile``), after counting FLOPs.

    Each batch size compiles once, in its own untimed first call (the warm-up), then is timed as eager was.
    """
    model.compile_inference(args.inference_compile)
    figures: dict[str, Any] = {"mode": args.inference_compile}
    for batch in args.batch_sizes:
        with torch.no_grad(), autocast():
            model(images(batch))
        timing = inference_figures(model, images(batch), result["gflops_per_image"], rate, autocast, args)
        eager = result["inference"][f"batch_{batch}"]
        warmup = sum(seconds for key, seconds in model.compiled_vision.warmup_seconds.items() if key[0][0] == batch)
        figures[f"batch_{batch}"] = timing | {
            "warmup_seconds": warmup,
            "speedup_vs_eager": eager["seconds_per_batch"] / timing["seconds_per_batch"],
        }
    warmups = model.compiled_vision.warmup_seconds
    figures["warmup_seconds_per_input"] = {str(key[0]): value for key, value in warmups.items()}
    return figures


def training_figures(
    module: torch.nn.Module,
    images: Callable[[int], torch.Tensor],
    shots: torch.Tensor,
    autocast: Callable[[], AbstractContextManager],
    args: argparse.Namespace,
) -> dict[str, float]:
    """One optimiser step of the method's training rule, against the frozen vision forward on the same batch."""
    model, device = module.model, shots.device
    if isinstance(module.training_rule, NormalFewShotPromptLearning):
        batch, batch_images = args.k_shot, shots
        module.prepare_shots(shots)  # a fit encodes the k shots once; each step runs the text side only

        def losses() -> dict[str, torch.Tensor]:
            return module.few_shot_losses()

    else:
        batch = args.train_batch_size
        batch_images = images(batch)
        size = batch_images.shape[-1]
        masks = torch.zeros(batch, size, size, device=device)
        masks[: batch // 2, size // 4 : size // 2, size // 4 : size // 2] = 1
        labels = (masks.flatten(1).amax(dim=1) > 0).long()

        def losses() -> dict[str, torch.Tensor]:
            return module.training_losses(batch_images, masks, labels)

    optimisers = module.configure_optimizers()
    optimiser = optimisers["optimizer"] if isinstance(optimisers, dict) else optimisers
    model.train()

    def training_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast():
            loss = losses()["loss"]
        loss.backward()
        optimiser.step()

    with PeakMemory(device) as peak:
        step_seconds = timed(training_step, device, args.repeats, args.warmup)
    with torch.no_grad(), autocast():
        vision = timed(
            lambda: model.encode_image(batch_images, model.feature_layers), device, args.repeats, args.warmup
        )
    model.eval()
    return {
        "batch_size": batch,
        "seconds": step_seconds,
        "vision_forward_seconds": vision,
        "step_over_vision_forward": step_seconds / vision,
        "peak_memory_mb": peak.megabytes,
    }


def precision_figures(
    model: torch.nn.Module,
    images: Callable[[int], torch.Tensor],
    autocast: Callable[[], AbstractContextManager],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Under mixed precision, the score and map differences from fp32 (:func:`precision_difference`)."""
    if args.precision == "fp32":
        return {}
    return {"score_difference_vs_fp32": precision_difference(model, images(4), autocast)}


def precision_difference(
    model: torch.nn.Module, batch_images: torch.Tensor, autocast: Callable[[], AbstractContextManager]
) -> dict[str, float]:
    """Largest score and map difference between the chosen precision and fp32 on the same images.

    Args:
        model: Torch model of a method.
        batch_images: Images to score.
        autocast: Factory of the mixed-precision context.

    Returns:
        Maximum absolute differences of ``pred_score`` and of the (smoothed) ``anomaly_map``.
    """
    model.eval()
    with torch.no_grad():
        reference = model(batch_images)
        with autocast():
            mixed = model(batch_images)
    return {
        "max_abs_score": (mixed.pred_score - reference.pred_score).abs().max().item(),
        "max_abs_map": (mixed.anomaly_map - reference.anomaly_map).abs().max().item(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with timing defaults that depend on the configuration and device.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Parsed arguments with ``repeats``, ``warmup`` and ``train_batch_size`` resolved.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--train-batch-size", type=int, default=None, help="default 8 (2 for large on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median (default 3; large CPU 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; large CPU 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--inference-compile",
        choices=COMPILE_MODES,
        default=None,
        help="also time the model with this inference_compile mode (reduce-overhead: CUDA graphs on GPUs)",
    )
    parser.add_argument(
        "--end-to-end", type=int, default=0, metavar="N", help="also time Engine.test on N full-size images"
    )
    parser.add_argument("--end-to-end-image-size", type=int, default=900, help="side of those PNG images")
    parser.add_argument(
        "--end-to-end-batch-size", type=int, default=None, help="their batch size (default: the largest batch size)"
    )
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step figures")
    parser.add_argument("--k-shot", type=int, default=4, help="normal references of few-shot methods (PromptAD)")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    # Checked before anything is measured: a large CPU run would otherwise fail after minutes.
    if args.end_to_end and (args.end_to_end < 2 or args.end_to_end % 2):
        parser.error(
            "--end-to-end takes an even number of images, at least 2 (half normal, half anomalous); "
            f"got {args.end_to_end}"
        )
    if args.end_to_end_batch_size is None:
        args.end_to_end_batch_size = max(args.batch_sizes)
    if args.end_to_end and args.end_to_end_batch_size not in args.batch_sizes:
        parser.error(
            f"--end-to-end-batch-size {args.end_to_end_batch_size} must be one of --batch-sizes {args.batch_sizes} "
            "(the model-only figure it is compared with)"
        )
    repeats, warmup, train_batch = TIMING_DEFAULTS.get((args.config, torch.device(args.device).type), DEFAULT_TIMING)
    args.repeats = repeats if args.repeats is None else args.repeats
    args.warmup = warmup if args.warmup is None else args.warmup
    args.train_batch_size = train_batch if args.train_batch_size is None else args.train_batch_size
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON report.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The report.
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # fp32 means fp32: no TF32 tensor-core products, for the reference rate and the models alike.
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
        torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    config = CONFIGS[args.config]
    rate = matmul_gflops(device, DTYPES[args.precision] if device.type == "cuda" else torch.float32)
    started = time.perf_counter()
    report = {
        "machine": machine(device) | {"matmul_gflops": rate},
        "config": {
            "name": args.config,
            **config,
            "precision": args.precision,
            "pretrained": None,
            "inference_compile": args.inference_compile,
            "end_to_end": args.end_to_end,
            "k_shot": args.k_shot,
            "training": not args.no_training,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "results": [benchmark_method(method, config, args, device, rate) for method in args.methods],
    }
    report["wall_seconds"] = time.perf_counter() - started
    return emit(report, args.output)


if __name__ == "__main__":
    main()
