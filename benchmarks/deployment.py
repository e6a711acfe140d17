"""Deployment precisions on this CPU: torch f32 against OpenVINO f32, bf16, fp16, INT8 (weights) and INT8 PTQ.

For each method at its released setting (AnomalyCLIP and FAPrompt: ViT-L-14-336 at 518; PromptAD: ViT-B-16-plus-240
at 240) and at ViT-B-16 at 224, in one run: seconds per image at batch 1 and 8, model size on disk, peak memory, and
the fidelity of each precision against torch f32 on the same images of synthetic categories (normal and anomalous,
with masks): max and mean |Δ score|, Spearman rank correlation of image scores, Pearson correlation of the maps, and
the change of image and pixel AUROC. The whole pipeline is measured (pre-processing, model, post-processing: what
anomalib exports), on raw images at the dataset's size.

How each row runs:
- ``torch``/``f32``: the Lightning module's ``forward``.
- ``openvino``/``f32``: the exported IR compiled with ``INFERENCE_PRECISION_HINT=f32``.
- ``openvino``/``bf16``: the same IR with the hint ``bf16`` (on a CPU without AVX512-BF16/AMX OpenVINO runs f32:
  the row is still measured, and ``inference_precision`` says what ran).
- ``model_mb``: torch: every parameter and buffer (the whole CLIP, text encoder included, and the prompts); OpenVINO:
  the IR's ``.xml`` and ``.bin`` (the vision encoder and the image-dependent tail; static text features are constants).
- ``peak_rss_mb``: the process's peak resident memory while the row ran, sampled; it includes the torch model, which
  the benchmark keeps as the reference.
- ``openvino``/``fp16``, ``int8``, ``int8_ptq``: ``--compression_type FP16`` (weights stored in f16), ``INT8`` (NNCF
  weight compression) and ``INT8_PTQ`` (NNCF quantization with the transformer settings, calibrated on the normal
  training images; no labels), compiled with the CPU's default hint, as anomalib's ``OpenVINOInferencer`` does.

The CLIP weights and prompts are random (no download here): speed does not depend on them, but fidelity with real
weights may differ, and the AUROCs are those of random features. PromptAD scores with a 1-image memory.

Examples:
    python benchmarks/deployment.py --output benchmarks/results/deployment_cpu.json   # everything, ~35 min here
    python benchmarks/deployment.py --methods AnomalyCLIP --configs vitb16 --precisions f32 int8_ptq   # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measure import METHODS, PeakMemory, accepted_settings, emit, machine

from anomalib_faprompt.methods import Learning

CPU = torch.device("cpu")
#: Per configuration, the settings that differ from the methods' released defaults.
CONFIGS: dict[str, dict[str, Any]] = {
    "released": {},
    "vitb16": {"backbone": "ViT-B-16", "image_size": 224, "dpam_layers": 10, "feature_layers": (3, 6, 9, 12)},
}
PRECISIONS = ("f32", "bf16", "fp16", "int8", "int8_ptq")
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def synthetic_data(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Test images (raw, float in [0, 1]) with labels and masks, and normal training images to calibrate on."""
    from PIL import Image

    from anomalib_faprompt.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(folder, categories=args.categories, n_train=args.calibration_images,
                                      n_test=args.test_images, image_size=args.input_size)  # fmt: skip

    def load(path: Path) -> np.ndarray:
        return (np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).transpose(2, 0, 1)

    images, labels, masks, normal = [], [], [], []
    for category in args.categories:
        normal += [load(path) for path in sorted((root / category / "train" / "good").glob("*.png"))]
        for path in sorted((root / category / "test").glob("*/*.png")):
            images.append(load(path))
            labels.append(int(path.parent.name != "good"))
            mask_path = root / category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            size = images[-1].shape[1:]
            masks.append(np.asarray(Image.open(mask_path)) > 0 if mask_path.exists() else np.zeros(size, bool))
    return {"images": np.stack(images), "labels": np.array(labels), "masks": np.stack(masks),
            "normal": np.stack(normal)}  # fmt: skip


def build_model(method: str, config: str) -> Any:
    """The method with random CLIP weights and prompts, able to score (PromptAD: one reference image)."""
    torch.manual_seed(0)
    settings = accepted_settings(METHODS[method], {**CONFIGS[config], "category": "stripes"})  # PromptAD's object
    model = METHODS[method](**settings, pretrained=None).eval()
    model.model.prompts_ready.fill_(True)  # random prompts: see the module docstring
    if Learning.FEW_SHOT_PROMPTS in METHODS[method].learning_types:  # scores against a visual memory
        size = model.model.image_size
        model.model.add_references(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            output = model(torch.from_numpy(images))
        return {"pred_score": output.pred_score.numpy(), "anomaly_map": output.anomaly_map.numpy()}

    return run


def torch_megabytes(model: torch.nn.Module) -> float:
    """What the torch pipeline loads: every parameter and buffer (the whole CLIP and the prompts), in MiB.

    Not ``state_dict``: checkpoints leave the frozen CLIP out (it comes from open_clip's weights file).
    """
    tensors = {tensor.data_ptr(): tensor for tensor in (*model.parameters(), *model.buffers())}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) / 2**20


def openvino_runner(model: Any, hint: str | None) -> tuple[Runner, str]:
    """An OpenVINO model compiled for the CPU (``hint``: ``INFERENCE_PRECISION_HINT``, ``None`` for the CPU's own)."""
    import openvino

    compiled = openvino.Core().compile_model(model, "CPU", {} if hint is None else {"INFERENCE_PRECISION_HINT": hint})
    reported = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return {next(iter(port.names)): value for port, value in compiled(images).items()}

    return run, reported


def openvino_model(onnx_path: Path, precision: str, folder: Path, normal: np.ndarray) -> tuple[Any, Path]:
    """The IR of ``precision`` written to ``folder`` (as anomalib's export writes it), and its path."""
    import openvino

    from anomalib_faprompt.export import quantize_transformer

    model = openvino.convert_model(onnx_path)
    if precision == "int8":
        import nncf

        model = nncf.compress_weights(model)
    elif precision == "int8_ptq":
        batches = [normal[start : start + 8] for start in range(0, len(normal), 8)]
        model = quantize_transformer(model, batches, len(normal))
    path = folder / f"{precision}.xml"
    openvino.save_model(model, path, compress_to_fp16=precision == "fp16")
    return openvino.Core().read_model(path), path


def run_all(run: Runner, images: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """Outputs on every image in batches of ``batch``, and each batch's seconds per image."""
    outputs: dict[str, list[np.ndarray]] = {"pred_score": [], "anomaly_map": []}
    seconds = []
    for start in range(0, len(images) - batch + 1, batch):
        begin = time.perf_counter()
        result = run(np.ascontiguousarray(images[start : start + batch]))
        seconds.append((time.perf_counter() - begin) / batch)
        for key in outputs:
            outputs[key].append(np.asarray(result[key]).reshape(batch, *np.asarray(result[key]).shape[1:]))
    return {key: np.concatenate(value) for key, value in outputs.items()}, seconds


def fidelity(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: dict[str, Any]) -> dict:
    """Scores and maps of a precision against torch f32's on the same images."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    scores, reference_scores = outputs["pred_score"].reshape(-1), reference["pred_score"].reshape(-1)
    size = outputs["anomaly_map"].shape[-2:]
    maps = outputs["anomaly_map"].reshape(len(scores), -1)
    reference_maps = reference["anomaly_map"].reshape(len(scores), -1)
    masks = torch.from_numpy(data["masks"][:, None].astype(np.float32))
    masks = torch.nn.functional.interpolate(masks, size=size, mode="nearest").numpy().reshape(len(scores), -1)
    delta = np.abs(scores - reference_scores)
    return {
        "max_abs_dscore": float(delta.max()),
        "mean_abs_dscore": float(delta.mean()),
        "spearman": float(spearmanr(scores, reference_scores).statistic),
        "map_pearson": float(np.corrcoef(maps.reshape(-1), reference_maps.reshape(-1))[0, 1]),
        "d_image_auroc": float(roc_auc_score(data["labels"], scores) - roc_auc_score(data["labels"], reference_scores)),
        "d_pixel_auroc": float(roc_auc_score(masks.reshape(-1) > 0, maps.reshape(-1))
                               - roc_auc_score(masks.reshape(-1) > 0, reference_maps.reshape(-1))),
        "image_auroc": float(roc_auc_score(data["labels"], scores)),
    }  # fmt: skip


def measure_precision(run: Runner, data: dict[str, Any], batches: list[int], repeats: int) -> dict[int, dict]:
    """Per batch size: seconds per image (median after one warm-up batch), peak memory, and the outputs."""
    measured = {}
    for batch in batches:
        with PeakMemory(CPU) as peak:
            if batch == max(batches):
                outputs, seconds = run_all(run, data["images"], batch)  # every image: fidelity and timing
                seconds = seconds[1:] or seconds
            else:
                outputs = None
                run(np.ascontiguousarray(data["images"][:batch]))  # warm-up
                _, seconds = run_all(run, data["images"][: batch * repeats], batch)
        measured[batch] = {"s_per_image": float(np.median(seconds)), "peak_rss_mb": peak.megabytes,
                           "outputs": outputs, "timed_batches": len(seconds)}  # fmt: skip
    return measured


def benchmark(method: str, config: str, data: dict[str, Any], args: argparse.Namespace, folder: Path) -> list[dict]:
    """Every precision of one method and configuration; rows of the report."""
    model = build_model(method, config)
    base = {"method": method, "backbone": model.hparams["backbone"], "image_size": model.model.image_size}
    work = folder / f"{method}_{config}"
    precisions = [("torch", "f32"), *(("openvino", precision) for precision in args.precisions)]
    onnx_path = model.to_onnx(work / "onnx") if len(precisions) > 1 else None
    rows, reference = [], None
    for runtime, precision in precisions:
        print(f"[deployment] {method} {config} {runtime} {precision}", file=sys.stderr, flush=True)
        if runtime == "torch":
            run, inference_precision = torch_runner(model), "f32"
            model_mb = torch_megabytes(model)
        else:
            ov_model, path = openvino_model(onnx_path, precision, work, data["normal"])
            hint = {"f32": "f32", "bf16": "bf16"}.get(precision)
            run, inference_precision = openvino_runner(ov_model, hint)
            model_mb = (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 2**20
        measured = measure_precision(run, data, args.batches, args.repeats)
        outputs = measured[max(args.batches)]["outputs"]
        reference = reference or outputs
        quality = fidelity(outputs, reference, data)
        for batch in args.batches:
            entry = measured[batch]
            rows.append({**base, "batch": batch, "runtime": runtime, "precision": precision,
                         "inference_precision": inference_precision, "s_per_image": entry["s_per_image"],
                         "timed_batches": entry["timed_batches"], "model_mb": model_mb,
                         "peak_rss_mb": entry["peak_rss_mb"], **quality})  # fmt: skip
        del run
        gc.collect()
    torch_seconds = {row["batch"]: row["s_per_image"] for row in rows if row["runtime"] == "torch"}
    for row in rows:
        row["speedup_vs_torch_f32"] = torch_seconds[row["batch"]] / row["s_per_image"]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the deployment benchmark and print its JSON report (``--output``: also write it, atomically)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["released", "vitb16"])
    parser.add_argument("--precisions", nargs="*", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed batches below the largest batch size")
    parser.add_argument("--categories", nargs="+", default=["stripes", "checker"])
    parser.add_argument("--test-images", type=int, default=4, help="normal and anomalous test images per category")
    parser.add_argument("--calibration-images", type=int, default=8, help="normal images per category for INT8_PTQ")
    parser.add_argument("--input-size", type=int, default=256, help="side of the raw images fed to every runtime")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    images = 2 * args.test_images * len(args.categories)
    if images < max(args.batches) or min(args.batches) < 1:
        parser.error(f"--batches {args.batches}: each at least 1 and at most the {images} test images "
                     "(2 x --test-images per category).")  # fmt: skip
    import openvino

    default_precision = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    report: dict[str, Any] = {
        **machine(CPU),
        "openvino": openvino.__version__,
        "openvino_cpu_default_precision": default_precision.get_type_name(),
        "command": "python benchmarks/deployment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "weights": "random CLIP weights and prompts (no download): fidelity with real weights may differ",
        "rows": [],
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        data = synthetic_data(Path(folder) / "data", args)
        report["images"] = {"test": len(data["images"]), "anomalous": int(data["labels"].sum()),
                            "size": args.input_size, "categories": args.categories,
                            "calibration": len(data["normal"])}  # fmt: skip
        for method in args.methods:
            for config in args.configs:
                report["rows"] += benchmark(method, config, data, args, Path(folder))
                if args.output:  # each finished configuration is kept if a later one fails
                    emit(report | {"complete": False}, args.output)
    report["complete"] = True
    return emit(report, args.output)


if __name__ == "__main__":
    main()
