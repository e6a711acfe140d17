"""INT8_PTQ with parts of the graph left in f32: does the similarity / top-M tail bound the fidelity?

The deployment benchmark (``deployment.py``) measures INT8_PTQ as ``anomalib export`` makes it. This script
quantizes the same exported graph three ways (NNCF, transformer settings) and compares each with torch f32 on the
same synthetic images:

- ``all``: every quantizable op quantized, as ``--compression_type INT8_PTQ`` does;
- ``similarities``: the similarity products left in f32, with the text
  (MatMuls whose last output dimension is the 2 classes, normal and anomalous: cosines scaled by 1/temperature
  amplify an INT8 rounding) and with a visual memory (the products whose maximum over the memory is taken:
  PromptAD's distance 1 - cos of near-identical features);
- ``tail``: the similarities and everything downstream of a top-M selection (FAPrompt's per-image DAP prompts: the
  prior network, the text encoder run per image, their similarities) left in f32.

Each row also holds OpenVINO's per-layer counters of one inference: where the time goes, by the precision each
layer's kernel ran in. The CLIP weights and prompts are random (no download here), as in ``deployment.py``.

Examples:
    python benchmarks/ptq_ignored_scopes.py --test-images 16 --output benchmarks/results/ptq_ignored_scopes_cpu.json
    python benchmarks/ptq_ignored_scopes.py --methods FAPrompt --configs vitb16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from deployment import CONFIGS, CPU, build_model, fidelity, openvino_runner, run_all, synthetic_data, torch_runner
from measure import METHODS, emit, machine

VARIANTS = ("all", "similarities", "tail")


def similarity_products(model: Any) -> set[str]:
    """The MatMul/Einsum ops that compare features with the prompts' text (the 2 classes as the last output
    dimension) or with a visual memory (followed by the maximum over the memory)."""
    names = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() not in {"MatMul", "Einsum"}:
            continue
        shape = op.get_output_partial_shape(0)
        last = shape[shape.rank.get_length() - 1]
        consumers = {target.get_node().get_type_name() for target in op.output(0).get_target_inputs()}
        if (last.is_static and last.get_length() == 2) or consumers & {"ReduceMax", "ReduceMin"}:
            names.add(op.get_friendly_name())
    return names


def f32_names(model: Any, variant: str) -> list[str]:
    """Names of the OpenVINO ops ``variant`` leaves unquantized (none for ``all``)."""
    if variant == "all":
        return []
    names = similarity_products(model)
    stack = [op for op in model.get_ordered_ops() if variant == "tail" and op.get_type_name() == "TopK"]
    while stack:  # every descendant of a top-M selection
        for output in stack.pop().outputs():
            for target in output.get_target_inputs():
                node = target.get_node()
                if node.get_friendly_name() not in names:
                    names.add(node.get_friendly_name())
                    stack.append(node)
    return sorted(names)


def quantized(onnx_path: Path, variant: str, normal: np.ndarray) -> tuple[Any, int, float]:
    """The graph quantized as ``variant`` says, how many ops stayed in f32, and the seconds NNCF took."""
    import openvino

    from anomalib_faprompt.export import quantize_transformer

    model = openvino.convert_model(onnx_path)
    names = f32_names(model, variant)
    begin = time.perf_counter()
    model = quantize_transformer(model, [normal], len(normal), keep_f32=names)
    return model, len(names), time.perf_counter() - begin


def layer_profile(graph: Any, image: np.ndarray, top: int = 8) -> dict[str, Any]:
    """OpenVINO's per-layer counters of one inference (CPU's default hint): milliseconds per executed precision
    (the suffix of each layer's kernel name: I8, BF16, FP32, ...) and the slowest layers."""
    import openvino

    request = openvino.Core().compile_model(graph, "CPU", {"PERF_COUNT": True}).create_infer_request()
    request.infer(image)  # the first call also prepares kernels
    request.infer(image)
    layers = [info for info in request.profiling_info if info.status == info.Status.EXECUTED]
    by_precision: dict[str, float] = {}
    for info in layers:
        precision = info.exec_type.rsplit("_", 1)[-1]
        by_precision[precision] = by_precision.get(precision, 0.0) + info.real_time.total_seconds() * 1e3
    slowest = sorted(layers, key=lambda info: info.real_time, reverse=True)[:top]
    return {"ms_by_exec_precision": dict(sorted(by_precision.items(), key=lambda item: -item[1])),
            "slowest_layers": [{"type": info.node_type, "exec_type": info.exec_type,
                                "ms": info.real_time.total_seconds() * 1e3} for info in slowest]}  # fmt: skip


def compare(method: str, config: str, data: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """One row per variant: fidelity against torch f32 and seconds per image at batch 1 (CPU's default hint)."""
    model = build_model(method, config)
    reference, _ = run_all(torch_runner(model), data["images"], 1)
    onnx_path = model.to_onnx(folder / f"{method}_{config}")
    rows = []
    for variant in VARIANTS:
        print(f"[ptq_ignored_scopes] {method} {config} {variant}", file=sys.stderr, flush=True)
        graph, kept, quantize_seconds = quantized(onnx_path, variant, data["normal"])
        run, precision = openvino_runner(graph, None)
        outputs, seconds = run_all(run, data["images"], 1)
        rows.append({"method": method, "backbone": model.hparams["backbone"], "image_size": model.model.image_size,
                     "variant": variant, "f32_ops": kept, "inference_precision": precision,
                     "quantize_seconds": quantize_seconds, "s_per_image": float(np.median(seconds[1:])),
                     "reference_score_std": float(reference["pred_score"].std()),
                     **fidelity(outputs, reference, data),
                     "profile": layer_profile(graph, np.ascontiguousarray(data["images"][:1]))})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print its JSON report (``--output``: also write it, atomically)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["vitb16"])
    parser.add_argument("--test-images", type=int, default=4, help="normal and anomalous test images per category")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    # The deployment benchmark's images (2 categories, 8 normal images each to calibrate on); more test images make
    # a finer AUROC (16 images: a swapped pair moves it by 1.6 points).
    data_args = argparse.Namespace(categories=["stripes", "checker"], test_images=args.test_images,
                                   calibration_images=8, input_size=256)  # fmt: skip
    report: dict[str, Any] = {
        **machine(CPU),
        "command": "python benchmarks/ptq_ignored_scopes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "weights": "random CLIP weights and prompts (no download): fidelity with real weights may differ",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        data = synthetic_data(Path(folder) / "data", data_args)
        report["images"] = {"test": len(data["images"]), "anomalous": int(data["labels"].sum()),
                            "calibration": len(data["normal"])}  # fmt: skip
        for method in args.methods:
            for config in args.configs:
                report["rows"] += compare(method, config, data, Path(folder))
    return emit(report, args.output)


if __name__ == "__main__":
    main()
