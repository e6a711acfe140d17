"""Cost of few-shot references: visual-memory size and scoring latency per k, printed as JSON.

Per method and k (normal reference images): the bytes of the visual memory (``layers × k × patches × width × 4``
in fp32, so linear in k), the seconds to add references (one vision forward per image), and the median latency
of scoring one image (batch 1), reported also as a ratio to k = 0 measured in the same run, with the process's
peak memory. One model per method is reused: the features of the largest k's references are computed once (one
vision forward each, ``add_reference_seconds``), and the memory of k references is their first k. Timings run in
rounds over every k (``--repeats`` rounds, median), so that the machine's load drifting shifts every k alike.

The methods are those that also score without references (k = 0, the reference point of the ratios):
AnomalyCLIP and FAPrompt. PromptAD scores only with its memory; ``benchmark.py --k-shot K`` measures it.

Weights and prompts are random (``pretrained=None``; cost does not depend on them), as in ``benchmark.py``,
whose configurations (``small``, ``large`` = ViT-L-14-336 at 518, the papers' setting) and timing helpers are
reused.

Examples:
    python benchmarks/few_shot.py --config small                      # ViT-B-16 at 224, ~1 min
    python benchmarks/few_shot.py --config large --ks 0 1 2 4 8       # ViT-L-14-336 at 518 (~7 s/image on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from benchmark import CONFIGS, METHODS, PeakMemory, build, emit, machine, timed

from anomalib_faprompt.methods import Learning

#: The methods that score at k = 0 too (zero-shot prompts with optional references).
REFERENCE_METHODS = sorted(name for name in METHODS if Learning.ZERO_SHOT in METHODS[name].learning_types)


def benchmark_references(method: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Memory bytes, reference cost and latency per k of one method (latency ratios to k = 0).

    Args:
        method: A method's short name (a key of ``benchmark.METHODS``).
        config: One of ``benchmark.CONFIGS``.
        args: Parsed command line (``ks``, ``repeats``, ``device``).

    Returns:
        The method's entry of the JSON report.
    """
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(method, config, device).model.eval()
    size = config["image_size"]
    image = torch.randn(1, 3, size, size, device=device)
    references = torch.randn(max(args.ks), 3, size, size, device=device)
    with torch.no_grad():
        model(image)  # caches the static text, encoded once at inference, not per image
    ks = sorted(args.ks)
    start = time.perf_counter()
    for index in range(ks[-1]):  # one forward per reference image
        model.add_references(references[index : index + 1])
    add_seconds = (time.perf_counter() - start) / ks[-1]
    full = model.references.bank
    patches = full.shape[1] // ks[-1]
    times: dict[int, list[float]] = {k: [] for k in ks}
    peaks: dict[int, float] = dict.fromkeys(ks, 0.0)
    # Rounds over every k, so that a change in the machine's load affects every k alike; the memory of the first k
    # references is the first k × patches entries of the full one.
    for _ in range(args.repeats):
        for k in ks:
            model.references.bank = full[:, : k * patches]
            with torch.no_grad(), PeakMemory(device) as peak:
                times[k].append(timed(lambda: model(image), device, repeats=1, warmup=0))
            peaks[k] = max(peaks[k], peak.megabytes)
    per_k = {}
    for k in ks:
        model.references.bank = full[:, : k * patches]
        per_k[k] = {
            "memory_bytes": model.references.nbytes,
            "seconds_per_image": statistics.median(times[k]),
            "seconds_per_image_runs": times[k],
            "peak_memory_mb": peaks[k],
        }
    base = per_k[min(per_k)]["seconds_per_image"]
    for figures in per_k.values():
        figures["latency_over_k0"] = figures["seconds_per_image"] / base
    layers, _, width = full.shape
    return {
        "method": method,
        "memory_layout": {"layers": layers, "patches_per_image": patches, "width": width, "dtype": "fp32"},
        "bytes_per_reference": full.numel() * full.element_size() // ks[-1],
        "add_reference_seconds": add_seconds,
        "per_k": {f"k_{k}": figures for k, figures in per_k.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the few-shot benchmark and print its JSON report.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The report.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="large")
    parser.add_argument("--methods", nargs="+", choices=REFERENCE_METHODS, default=REFERENCE_METHODS)
    parser.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4, 8], help="reference counts (0 first)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of timed images over every k, median (batch 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if 0 not in args.ks or max(args.ks) < 1:
        parser.error("--ks must include 0 and a k >= 1: latency is reported as a ratio to k = 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    started = time.perf_counter()
    report = {
        "machine": machine(device),
        "config": {"name": args.config, **config, "precision": "fp32", "pretrained": None, "batch_size": 1}
        | {"repeats": args.repeats, "ks": sorted(args.ks)},
        "results": [benchmark_references(method, config, args) for method in args.methods],
    }
    report["wall_seconds"] = time.perf_counter() - started
    return emit(report, args.output)


if __name__ == "__main__":
    main()
