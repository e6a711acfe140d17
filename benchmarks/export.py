"""Exported models against torch: parity and latency of ONNX Runtime and OpenVINO on this machine.

Per method: the time to export, the largest score and map difference of each exported model from
the torch pipeline (pre-processing, model, post-processing: what anomalib exports) on the same raw
images, and the median latency of each backend on them, all in one run, so speed-ups are ratios
measured together. Prompts and CLIP weights are random (speed and export fidelity do not depend on
them); the refusal to export untrained prompts is lifted for that reason only.

OpenVINO is compiled with ``INFERENCE_PRECISION_HINT`` set (f32 unless ``--openvino-precision`` says
otherwise): the CPU plugin's own default is bf16 on CPUs with AVX512-BF16 or AMX. The report records the
precision the compiled model reports (a CPU without bf16/f16 runs f32 whatever is asked) and the CPU's default.

Examples:
    python benchmarks/export.py                              # small CLIP (ViT-B-16 layout at 224), ~2 min
    python benchmarks/export.py --config large --repeats 3   # ViT-L-14-336 at 518, the papers' setting
    python benchmarks/export.py --openvino-precision bf16    # OpenVINO's default on bf16 CPUs: faster, less exact
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measure import METHODS, accepted_settings, emit, machine, timed

CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"backbone": "ViT-B-16", "image_size": 224, "dpam_layers": 10, "feature_layers": (3, 6, 9, 12)},
    "large": {"backbone": "ViT-L-14-336", "image_size": 518, "dpam_layers": 19, "feature_layers": (6, 12, 18, 24)},
}
CPU = torch.device("cpu")
Runner = Callable[[], dict[str, np.ndarray]]


def benchmark_method(method: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Export one method to ONNX and OpenVINO, then compare outputs and latency with torch.

    Args:
        method: A method's short name (a key of :data:`METHODS`).
        args: Parsed command line.
        folder: Where the exported files go.

    Returns:
        The method's entry of the JSON report.
    """
    torch.manual_seed(0)
    settings = accepted_settings(METHODS[method], CONFIGS[args.config])
    model = METHODS[method](**settings, pretrained=None).eval()
    model.model.prompts_ready.fill_(True)  # random prompts: fine for speed and export fidelity, see the docstring
    start = time.perf_counter()
    onnx_path = model.to_onnx(folder / method)
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    openvino_path = model.to_openvino(folder / method)
    openvino_seconds = time.perf_counter() - start

    # Raw images at another size than the model's: the exported graphs resize them themselves.
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.input_size, args.input_size, generator=generator)
    openvino_run, openvino_precision = openvino_runner(openvino_path, images, args.openvino_precision)
    backends = {"torch": torch_runner(model, images), "onnxruntime": onnx_runner(onnx_path, images),
                "openvino": openvino_run}  # fmt: skip
    reference = backends["torch"]()
    seconds = {name: timed(run, CPU, args.repeats, 1) / args.batch_size for name, run in backends.items()}
    return {
        "method": method,
        "openvino_inference_precision": openvino_precision,
        "export_seconds": {"onnx": onnx_seconds, "openvino": openvino_seconds},
        "max_difference_vs_torch": {
            name: max_differences(run(), reference) for name, run in backends.items() if name != "torch"
        },
        "seconds_per_image": seconds,
        "speedup_vs_torch": {name: seconds["torch"] / value for name, value in seconds.items() if name != "torch"},
    }


def max_differences(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest absolute difference of score and map from the reference's."""
    return {key: float(np.abs(np.asarray(outputs[key]).reshape(reference[key].shape) - reference[key]).max())
            for key in ("pred_score", "anomaly_map")}  # fmt: skip


def torch_runner(model: torch.nn.Module, images: torch.Tensor) -> Runner:
    """The Lightning module's ``forward`` (pre-processing, model, post-processing), as anomalib exports it."""

    def run() -> dict[str, np.ndarray]:
        with torch.no_grad():
            output = model(images)
        return {"pred_score": output.pred_score.numpy(), "anomaly_map": output.anomaly_map.numpy()}

    return run


def onnx_runner(path: Path, images: torch.Tensor) -> Runner:
    """The ONNX graph in ONNX Runtime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name, output_names = session.get_inputs()[0].name, [node.name for node in session.get_outputs()]
    array = images.numpy()
    return lambda: dict(zip(output_names, session.run(None, {input_name: array}), strict=True))


def openvino_runner(path: Path, images: torch.Tensor, precision: str) -> tuple[Runner, str]:
    """The OpenVINO model compiled for the CPU with ``INFERENCE_PRECISION_HINT`` = ``precision``, and the precision
    the compiled model reports (a CPU without bf16/f16 runs f32 whatever is asked)."""
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    array = images.numpy()
    reported = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return lambda: {next(iter(port.names)): value for port, value in compiled(array).items()}, reported


def openvino_machine() -> dict[str, Any]:
    """The runtimes' versions and what OpenVINO's CPU plugin can do and does by default."""
    import onnxruntime
    import openvino

    core = openvino.Core()
    return {
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        "openvino_cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
        "openvino_cpu_default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the export benchmark and print its JSON report.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The report.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-size", type=int, default=256, help="raw image size fed to every backend")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--openvino-precision",
        choices=["f32", "bf16", "f16"],
        default="f32",
        help="OpenVINO's INFERENCE_PRECISION_HINT (default f32; the CPU's own default is in the report)",
    )
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    # The exporters report progress on stdout; keep stdout for the JSON report.
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        results = [benchmark_method(method, args, Path(folder)) for method in args.methods]
    report = {
        "machine": machine(CPU) | openvino_machine(),
        "config": {
            "name": args.config,
            **CONFIGS[args.config],
            "pretrained": None,
            "batch_size": args.batch_size,
            "input_size": args.input_size,
            "repeats": args.repeats,
            "openvino_precision_requested": args.openvino_precision,
        },
        "results": results,
    }
    return emit(report, args.output)


if __name__ == "__main__":
    main()
