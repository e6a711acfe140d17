"""``anomalib-faprompt-demo``: the zero-shot protocol end to end on generated data.

Learns AnomalyCLIP and FAPrompt prompts on some synthetic categories (auxiliary) and tests on
others (held out, never seen in training), then prints the table and writes heat-maps; the
categories are generated on first use (``SyntheticAD``). It uses real CLIP weights when they are
on disk or downloadable, otherwise a small CLIP: the reference small CLIP of ``shared/golden``
when found, else one with random weights. Which one it used, and what the numbers then mean, is
printed, and the table, chart and heat-maps name untrained weights.

Example:
    $ anomalib-faprompt-demo --output results/demo
    $ anomalib-faprompt-demo --backbone ViT-B-16 --pretrained /path/to/ViT-B-16.pt
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

AUXILIARY = ("stripes", "checker", "grain")
HELD_OUT = ("disc", "plate")
SMALL_CONFIG = Path(__file__).parent / "clip" / "configs" / "clip_small.json"


def _online(host: str = "huggingface.co") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def choose_clip(backbone: str | None, pretrained: str | None) -> tuple[dict[str, Any], str]:
    """Pick CLIP settings and say what they mean."""
    from anomalib_faprompt.clip import WeightsNotFoundError, build_clip

    if backbone or pretrained:
        backbone = backbone or "ViT-B-16"
        return _vit_b(backbone, pretrained), f"CLIP {backbone} with weights '{pretrained}' (as requested)."
    if not _online():  # use cached weights if any, without the hub's minute of retries
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        build_clip("ViT-B-16", "openai")
    except (WeightsNotFoundError, RuntimeError, OSError):
        pass
    else:
        return _vit_b("ViT-B-16", "openai"), "OpenAI's CLIP ViT-B-16 (real weights): the numbers are meaningful."
    shared = Path(os.environ.get("ANOMALIB_FAPROMPT_SHARED", Path.cwd().parent / "shared")) / "golden"
    small = {"image_size": 224, "dpam_layers": 6, "backbone": str(SMALL_CONFIG)}
    if (shared / "clip_small_seed0.pt").is_file():
        small |= {"backbone": str(shared / "clip_small.json"), "pretrained": str(shared / "clip_small_seed0.pt")}
        note = f"the small reference CLIP of {shared} (random, untrained weights)"
    else:
        small["pretrained"] = None
        note = "a small CLIP with randomly initialised weights"
    return small, (
        f"No real CLIP weights found or downloadable: using {note}. Its features carry no semantics, so the "
        "table shows the pipeline working, not what AnomalyCLIP/FAPrompt reach with CLIP; pass "
        "--pretrained /path/to/ViT-B-16.pt (OpenAI's file) for real numbers."
    )


def _vit_b(backbone: str, pretrained: str | None) -> dict[str, Any]:
    return {"backbone": backbone, "pretrained": pretrained, "image_size": 224, "dpam_layers": 10}


def protocol(output: Path, clip: dict[str, Any], max_epochs: int, seed: int) -> dict[str, Any]:
    """The zero-shot config: auxiliary synthetic categories -> held-out ones, both prompt methods."""
    root = output / "datasets" / "synthetic"
    layers = (2, 4, 6, 8) if clip["dpam_layers"] == 6 else (3, 6, 9, 12)
    generation = {"n_train": 4, "n_test": 8, "generation_seed": seed}  # written on first use
    dataset = {"class_path": "SyntheticAD", "init_args": {"root": str(root), **generation}}
    return {
        "seed": seed,
        "accelerator": "auto",
        "max_epochs": max_epochs,
        "train_batch_size": 8,
        "eval_batch_size": 8,
        "num_workers": 0,
        "results_dir": str(output / "zero_shot"),
        "auxiliary": {"dataset": dataset, "categories": list(AUXILIARY)},
        "targets": [{"dataset": dataset, "categories": list(HELD_OUT)}],
        "models": [
            {"class_path": "AnomalyCLIP", "init_args": {**clip, "feature_layers": list(layers)}},
            {"class_path": "FAPrompt", "init_args": clip},
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("results/demo"), help="where data and results go")
    parser.add_argument("--backbone", default=None, help="open_clip name or JSON config (default: automatic)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: automatic)")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    clip, note = choose_clip(args.backbone, args.pretrained)
    print(f"[anomalib-faprompt demo] {note}")
    from anomalib_faprompt.pipelines import ZeroShot

    ZeroShot().run_config(protocol(args.output, clip, args.max_epochs, args.seed))
    print(f"\n[anomalib-faprompt demo] {note}")
    print(f"Heat-maps: {args.output / 'zero_shot'}/<model>/<settings fingerprint>/SyntheticAD/<category>/images")


if __name__ == "__main__":
    main()
