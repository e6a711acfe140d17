"""``Engine.test`` on full-size images against the model alone: what decoding, transfer and pre-processing cost.

Part of :mod:`benchmark` (``--end-to-end N``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from measure import METHODS, accepted_settings, synchronise

from anomalib_faprompt.methods import Learning

#: The category of methods whose prompts name the object (PromptAD's manual anomaly states).
CATEGORY = "bottle"
#: Lightning's precision per ``--precision``.
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def end_to_end(
    method: str, config: dict[str, Any], args: argparse.Namespace, device: torch.device, result: dict[str, Any]
) -> dict[str, Any]:
    """``Engine.test`` on a folder of full-size PNG images against the model alone, in images per second.

    The engine path decodes the PNGs in ``--num-workers`` loader processes (pinned memory on GPUs), moves the
    full-size batch to the device, resizes it there (anomalib's pre-processor runs on the device), runs the model,
    post-processes and computes the default metrics; visualisation is off (it writes files, a cost of its own).
    Two identical runs; the second is reported (the first pays one-off costs: loader start-up, lazy CUDA
    initialisation, compilation). The model-only figure is the same batch size's inference figure of this run
    (``result``, the method's report so far); ``args`` gives the images, their size and the loader processes.
    """
    import tempfile

    from anomalib.data import MVTecAD

    from anomalib_faprompt.data import generate_synthetic_dataset

    batch = args.end_to_end_batch_size
    inference = result.get("inference_compiled", result["inference"])[f"batch_{batch}"]
    settings = accepted_settings(METHODS[method], {**config, "category": CATEGORY})
    torch.manual_seed(0)
    module = METHODS[method](**settings, pretrained=None, allow_untrained_prompts=True,
                             inference_compile=args.inference_compile, visualizer=False)  # fmt: skip
    precision = PRECISIONS[args.precision]
    with tempfile.TemporaryDirectory() as folder:
        # Half normal, half anomalous with masks, as the metrics need both.
        root = generate_synthetic_dataset(
            folder,
            categories=["stripes"],
            n_train=1,
            n_test=args.end_to_end // 2,
            image_size=args.end_to_end_image_size,
        )
        datamodule = MVTecAD(
            root=root, category="stripes", eval_batch_size=batch, train_batch_size=1, num_workers=args.num_workers
        )
        if Learning.FEW_SHOT_PROMPTS in METHODS[method].learning_types:
            module.model.add_references(torch.randn(args.k_shot, 3, config["image_size"], config["image_size"]))
        seconds = [engine_seconds(module, datamodule, device, precision, folder) for _ in range(2)]
        images = len(datamodule.test_data)
    engine_rate = images / seconds[-1]
    return {
        "images": images,
        "image_size": args.end_to_end_image_size,
        "batch_size": batch,
        "num_workers": args.num_workers,
        "precision": precision,
        "engine_seconds": seconds[-1],
        "engine_seconds_first_run": seconds[0],
        "engine_images_per_second": engine_rate,
        "model_images_per_second": inference["images_per_second"],
        "engine_over_model": engine_rate / inference["images_per_second"],
    }


def engine_seconds(
    module: torch.nn.Module, datamodule: Any, device: torch.device, precision: str, folder: str
) -> float:
    """Wall time of one ``Engine.test`` of ``module`` on ``datamodule``, without progress bar or logger."""
    from anomalib.engine import Engine

    engine = Engine(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                    precision=precision, logger=False, default_root_dir=folder, enable_progress_bar=False)  # fmt: skip
    start = time.perf_counter()
    engine.test(module, datamodule=datamodule, verbose=False)
    synchronise(device)
    return time.perf_counter() - start
