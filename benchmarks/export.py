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
import inspect
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_faprompt.methods import METHODS as METHOD_LIST

CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"backbone": "ViT-B-16", "image_size": 224, "dpam_layers": 10, "feature_layers": (3, 6, 9, 12)},
    "large": {"backbone": "ViT-L-14-336", "image_size": 518, "dpam_layers": 19, "feature_layers": (6, 12, 18, 24)},
}
#: Every method of the package (``anomalib_faprompt.methods.METHODS``), by short name.
METHODS = {name: method.load() for name, method in METHOD_LIST.items()}


def accepted_settings(model_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that ``model_class`` takes (``feature_layers`` only where a method has them)."""
    parameters = inspect.signature(model_class.__init__).parameters
    return {key: value for key, value in config.items() if key in parameters}


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``function`` after one untimed run.

    Args:
        function: Work to time.
        repeats: Timed runs.

    Returns:
        Median seconds per run.
    """
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_method(method: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Export one method to ONNX and OpenVINO, then compare outputs and latency with torch.

    Args:
        method: A method's short name (a key of :data:`METHODS`).
        args: Parsed command line.
        folder: Where the exported files go.

    Returns:
        The method's entry of the JSON report.
    """
    import onnxruntime
    import openvino

    torch.manual_seed(0)
    config = CONFIGS[args.config]
    settings = accepted_settings(METHODS[method], config)
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
    array = images.numpy()

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [node.name for node in session.get_outputs()]
    compiled = openvino.Core().compile_model(
        str(openvino_path), "CPU", {"INFERENCE_PRECISION_HINT": args.openvino_precision}
    )

    def run_torch() -> dict[str, np.ndarray]:
        with torch.no_grad():
            output = model(images)
        return {"pred_score": output.pred_score.numpy(), "anomaly_map": output.anomaly_map.numpy()}

    def run_onnx() -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(None, {input_name: array}), strict=True))

    def run_openvino() -> dict[str, np.ndarray]:
        return {next(iter(port.names)): value for port, value in compiled(array).items()}

    backends = {"torch": run_torch, "onnxruntime": run_onnx, "openvino": run_openvino}
    reference = run_torch()
    result: dict[str, Any] = {
        "method": method,
        "openvino_inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        "export_seconds": {"onnx": onnx_seconds, "openvino": openvino_seconds},
        "max_difference_vs_torch": {},
        "seconds_per_image": {},
    }
    for name, run in backends.items():
        if name != "torch":
            outputs = run()
            result["max_difference_vs_torch"][name] = {
                key: float(np.abs(np.asarray(outputs[key]).reshape(reference[key].shape) - reference[key]).max())
                for key in ("pred_score", "anomaly_map")
            }
        result["seconds_per_image"][name] = median_seconds(run, args.repeats) / args.batch_size
    torch_seconds = result["seconds_per_image"]["torch"]
    result["speedup_vs_torch"] = {
        name: torch_seconds / seconds for name, seconds in result["seconds_per_image"].items() if name != "torch"
    }
    return result


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

    import onnxruntime
    import openvino

    # The exporters report progress on stdout; keep stdout for the JSON report.
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        results = [benchmark_method(method, args, Path(folder)) for method in args.methods]
    core = openvino.Core()
    report = {
        "machine": {
            "device": platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__,
            "openvino_cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
            "openvino_cpu_default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
            "python": sys.version.split()[0],
        },
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
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
