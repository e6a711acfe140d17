"""One prompt-learning fit and test, in one process or under DDP: run by ``test_distributed.py`` in a subprocess.

Lightning's ``strategy="ddp"`` on CPU starts the other processes by running this script's command line again
(``_SubprocessScriptLauncher``), which inside pytest would rerun pytest; hence a script of its own. Rank 0 writes
``prompts.pt`` (initial and learned values, the gradients of each optimiser step), ``metrics.json`` (test metrics
and the post-processor's statistics); every rank writes ``scored-rank<r>.json``, the images it scored in the test.

Example:
    python tests/distributed_run.py --method FAPrompt --root data --out run --devices 2 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer, seed_everything

from anomalib_faprompt import AnomalyCLIP, FAPrompt, PromptAD
from anomalib_faprompt.data import AuxiliaryDataModule

GOLDEN = Path(os.environ.get("ANOMALIB_FAPROMPT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "golden"


class ScoredImages(Callback):
    """Records the images this process scored in the test and their raw scores, in ``scored-rank<r>.json``.

    A callback of the trainer: it runs before the model's post-processor, which normalises the scores.
    """

    def __init__(self, out: Path) -> None:
        self.out, self.paths, self.scores = out, [], []

    def on_test_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
        del trainer, pl_module, batch, args
        self.paths.extend(str(path) for path in outputs.image_path)
        self.scores.extend(outputs.pred_score.flatten().tolist())

    def on_test_end(self, trainer: Trainer, pl_module: Any) -> None:
        del pl_module
        sampler = type(trainer.test_dataloaders.sampler).__name__
        content = {"paths": self.paths, "scores": self.scores, "sampler": sampler, "world_size": trainer.world_size}
        (self.out / f"scored-rank{trainer.global_rank}.json").write_text(json.dumps(content))


class OptimiserSteps(Callback):
    """The gradients of the learned parameters each optimiser step applies (under DDP: averaged over processes)."""

    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
        del trainer, optimizer
        parameters = pl_module.model.named_parameters()
        self.gradients.append({name: value.grad.clone() for name, value in parameters if value.grad is not None})


def learned_parameters(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the parameters prompt learning trains."""
    return {name: value.detach().clone() for name, value in model.model.named_parameters() if value.requires_grad}


def build(method: str, root: Path, batch_size: int) -> tuple[Any, Any]:
    """The model (the small random CLIP at its native 112 px) and its data."""
    if method == "PromptAD":
        clip = {"backbone": str(GOLDEN / "clip_small_promptad.json"), "image_size": 112, "category": "disc"}
        model = PromptAD(**clip, pretrained=str(GOLDEN / "clip_small_promptad_seed1.pt"), k_shot=2, max_epochs=3)
        return model, MVTecAD(root=root, category="disc", train_batch_size=batch_size, eval_batch_size=2, num_workers=0)
    clip = {"backbone": str(GOLDEN / "clip_small.json"), "pretrained": str(GOLDEN / "clip_small_seed0.pt")}
    model = {"AnomalyCLIP": AnomalyCLIP, "FAPrompt": FAPrompt}[method](**clip, image_size=112, dpam_layers=6)
    data = AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=root, category="stripes", num_workers=0)],
        target=MVTecAD(root=root, category="disc", num_workers=0),
        train_batch_size=batch_size,
        eval_batch_size=2,
        num_workers=0,
    )
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["AnomalyCLIP", "FAPrompt", "PromptAD"])
    parser.add_argument("--root", type=Path, required=True, help="synthetic data with categories stripes and disc")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    seed_everything(0)
    model, data = build(args.method, args.root, args.batch_size)
    initial = learned_parameters(model)
    engine = Engine(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        default_root_dir=args.out / "results",
        callbacks=[ScoredImages(args.out), steps := OptimiserSteps()],
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=data)
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    engine.trainer.strategy.barrier("scored")  # every rank's file is written before rank 0 ends the run
    if engine.trainer.is_global_zero:
        learned = {"initial": initial, "learned": learned_parameters(model), "gradients": steps.gradients}
        torch.save(learned, args.out / "prompts.pt")
        post = model.post_processor
        names = ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
        statistics = {name: float(getattr(post, name)) for name in names}
        content = {"metrics": {name: float(value) for name, value in metrics.items()}, "post_processor": statistics}
        (args.out / "metrics.json").write_text(json.dumps(content, indent=1))


if __name__ == "__main__":
    main()
