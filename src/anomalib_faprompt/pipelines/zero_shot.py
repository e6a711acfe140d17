"""The zero-shot protocol as an anomalib pipeline: ``anomalib zero_shot --config <protocol>.yaml``.

Each prompt-learning model (AnomalyCLIP, FAPrompt) is fitted once on the auxiliary data and then
tested unchanged on every category of every target dataset; zero-shot baselines (WinClip) are
tested directly, and one-class baselines (PatchCore, or any anomalib model) are fitted on each
target category's normal images. Metrics are the papers' four — image AUROC and AP, pixel AUROC
and AUPRO (FPR ≤ 0.3) — computed by anomalib's metrics on the models' *raw* scores and maps
(no normalisation, no thresholds). Results: ``results.csv``, ``results.md`` and ``results.png``,
plus heat-maps from anomalib's visualiser. Finished models and categories are kept, so an
interrupted run resumes where it stopped.

Config (YAML)::

    seed: 0
    accelerator: auto
    max_epochs: 15
    train_batch_size: 8
    eval_batch_size: 8
    num_workers: 4
    results_dir: results/zero_shot
    auxiliary:
      dataset: {class_path: MVTecAD, init_args: {root: ./datasets/MVTecAD}}
      categories: [bottle, cable]          # or "all"
    targets:
      - dataset: {class_path: Visa, init_args: {root: ./datasets/VisA}}
        categories: all
    models:
      - class_path: FAPrompt
      - {class_path: Patchcore, init_args: {backbone: wide_resnet50_2}}

Example:
    >>> from anomalib_faprompt.pipelines import ZeroShot
    >>> ZeroShot().run_config("configs/zero_shot/synthetic.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from anomalib import LearningType
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.metrics.base import AnomalibMetric
from anomalib.models import get_model
from anomalib.pipelines.components.base import Pipeline, Runner
from lightning.pytorch import seed_everything
from torchmetrics.classification import BinaryAveragePrecision

from anomalib_faprompt.data import AuxiliaryDataModule
from anomalib_faprompt.models.prompt_module import PromptLearningMixin

logger = logging.getLogger(__name__)

METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AUPRO")


class AP(AnomalibMetric, BinaryAveragePrecision):  # type: ignore[misc]
    """Average precision (scikit-learn's definition) as an anomalib metric; reported as ``<prefix>AP``."""


def zero_shot_evaluator() -> Evaluator:
    """The papers' four metrics, on raw outputs."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AP(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3),
        ],
    )


def _datamodule_class(config: dict[str, Any]) -> type[AnomalibDataModule]:
    class_path = config["class_path"]
    module_name, _, name = class_path.rpartition(".")
    module = importlib.import_module(module_name or "anomalib.data")
    try:
        return getattr(module, name)
    except AttributeError as error:
        msg = f"Unknown datamodule '{class_path}'; use an anomalib datamodule name (MVTecAD, Visa, MPDD, BTAD, …)."
        raise ValueError(msg) from error


class DatasetSpec:
    """A dataset of the protocol: datamodule class, its arguments and the categories to use.

    Args:
        config: ``{"dataset": {"class_path": ..., "init_args": {...}}, "categories": [...] | "all"}``.
        defaults: Datamodule arguments shared by all datasets (batch sizes, workers).
    """

    def __init__(self, config: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.datamodule_class = _datamodule_class(config["dataset"])
        self.init_args = {**defaults, **config["dataset"].get("init_args", {})}
        self.name = self.datamodule_class.__name__
        self.root = Path(self.init_args.get("root", ""))
        self.has_categories = "category" in inspect.signature(self.datamodule_class).parameters
        if not self.has_categories:  # single-category datasets (e.g. Kolektor)
            self.categories = [self.name.lower()]
            if not self.root.is_dir():
                msg = f"{self.name}: dataset not found at '{self.root}'. Download it there or fix init_args.root."
                raise FileNotFoundError(msg)
            return
        module = sys.modules[self.datamodule_class.__module__]
        dataset_module = importlib.import_module(module.__name__.replace(".datamodules.", ".datasets."))
        known = list(getattr(dataset_module, "CATEGORIES", None) or getattr(module, "CATEGORIES", ()))
        on_disk = sorted(path.name for path in self.root.iterdir() if path.is_dir()) if self.root.is_dir() else []
        categories = config.get("categories", "all")
        if categories == "all":
            categories = known or on_disk
        unknown = [category for category in categories if category not in known and category not in on_disk]
        if unknown:
            msg = f"{self.name}: unknown categories {unknown}; available: {known or on_disk}."
            raise ValueError(msg)
        missing = [category for category in categories if not (self.root / category).is_dir()]
        if missing:
            msg = (
                f"{self.name}: categories {missing} not found under '{self.root}'. Download the dataset there "
                f"(anomalib's datamodules do this when online) or fix init_args.root in the config."
            )
            raise FileNotFoundError(msg)
        self.categories = list(categories)

    def datamodule(self, category: str) -> AnomalibDataModule:
        """The datamodule of one category."""
        if not self.has_categories:
            return self.datamodule_class(**self.init_args)
        return self.datamodule_class(**self.init_args, category=category)


class ZeroShot(Pipeline):
    """Fit zero-shot models once on auxiliary data, test them on every target category, tabulate."""

    def _setup_runners(self, args: dict) -> list[Runner]:
        del args
        return []

    def run(self, args: Any = None) -> pd.DataFrame:
        """Run from CLI arguments (a namespace with ``config``)."""
        return self.run_config(self._get_args(args))

    def run_config(self, config: dict[str, Any] | str | Path) -> pd.DataFrame:
        """Run the protocol described by a config dict or YAML file; returns the results table."""
        if not isinstance(config, dict):
            config = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        config = copy.deepcopy(config)
        seed_everything(config.get("seed", 0), workers=True)
        defaults = {
            "train_batch_size": config.get("train_batch_size", 8),
            "eval_batch_size": config.get("eval_batch_size", 8),
            "num_workers": config.get("num_workers", 4),
        }
        auxiliary = DatasetSpec(config["auxiliary"], defaults)
        targets = [DatasetSpec(target, defaults) for target in config["targets"]]
        results_dir = Path(config.get("results_dir", "results/zero_shot"))
        results_dir.mkdir(parents=True, exist_ok=True)
        engine_args = {"accelerator": config.get("accelerator", "auto"), "devices": 1}

        rows = []
        for model_config in config["models"]:
            rows.extend(self._run_model(model_config, auxiliary, targets, results_dir, engine_args, config, defaults))
        table = summarise(pd.DataFrame(rows))
        write_results(table, results_dir)
        print(f"\nZero-shot results (raw scores and maps), written to {results_dir}:\n")
        print(to_markdown(table))
        return table

    def _run_model(
        self,
        model_config: dict[str, Any],
        auxiliary: DatasetSpec,
        targets: list[DatasetSpec],
        results_dir: Path,
        engine_args: dict[str, Any],
        config: dict[str, Any],
        defaults: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        model = get_model(copy.deepcopy(model_config))
        model_dir = results_dir / model.name
        if isinstance(model, PromptLearningMixin) and model.prompt_weights is None:
            prompts = model_dir / "prompts.pt"
            if prompts.is_file():
                logger.info("Resuming: %s prompts already learned at %s", model.name, prompts)
            else:
                datamodule = AuxiliaryDataModule(
                    [auxiliary.datamodule(category) for category in auxiliary.categories],
                    targets[0].datamodule(targets[0].categories[0]),
                    **defaults,
                )
                engine = Engine(max_epochs=config.get("max_epochs", 15), default_root_dir=model_dir, **engine_args)
                engine.fit(model, datamodule=datamodule)
                model.save_prompt_weights(prompts)
            model = get_model(copy.deepcopy(model_config), prompt_weights=str(prompts))

        for target in targets:
            for category in target.categories:
                row_file = model_dir / "rows" / f"{target.name}_{category}.json"
                if row_file.is_file():
                    yield json.loads(row_file.read_text())
                    continue
                datamodule = target.datamodule(category)
                # Baselines start afresh per category (PatchCore fits on its normals, WinClip takes its name).
                evaluated = model if isinstance(model, PromptLearningMixin) else get_model(copy.deepcopy(model_config))
                engine = Engine(default_root_dir=model_dir / target.name / category, **engine_args)
                if evaluated.learning_type == LearningType.ONE_CLASS:
                    engine.fit(evaluated, datamodule=datamodule)
                evaluated.post_processor = None  # metrics on raw scores and maps
                evaluated.evaluator = zero_shot_evaluator()
                if evaluated.visualizer is not None:  # a visualiser keeps the folder of its first run
                    evaluated.visualizer = evaluated.configure_visualizer()
                metrics = engine.test(evaluated, datamodule=datamodule, verbose=False)[0]
                row = {"model": model.name, "dataset": target.name, "category": category}
                row |= {name: float(metrics[name]) for name in METRICS}
                row_file.parent.mkdir(parents=True, exist_ok=True)
                row_file.write_text(json.dumps(row))
                yield row


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-category rows plus, per model, the mean over all target categories."""
    means = rows.groupby("model", sort=False)[list(METRICS)].mean().reset_index()
    means["dataset"], means["category"] = "mean", "mean"
    return pd.concat([rows, means], ignore_index=True)[["model", "dataset", "category", *METRICS]]


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table with metrics in percent."""
    header = "| model | dataset | category | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    for row in table.itertuples(index=False):
        values = " | ".join(f"{100 * getattr(row, name):.1f}" for name in METRICS)
        lines.append(f"| {row.model} | {row.dataset} | {row.category} | {values} |")
    return "\n".join(lines)


def write_results(table: pd.DataFrame, results_dir: Path) -> None:
    """Write ``results.csv``, ``results.md`` and a bar chart of the means, ``results.png``."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    table.to_csv(results_dir / "results.csv", index=False)
    (results_dir / "results.md").write_text(to_markdown(table) + "\n", encoding="utf-8")
    means = table[table.category == "mean"].set_index("model")[list(METRICS)] * 100
    axes = means.T.plot.bar(figsize=(8, 4), rot=0, ylim=(0, 100), ylabel="%", title="Zero-shot, mean over targets")
    axes.legend(loc="lower right")
    plt.tight_layout()
    plt.savefig(results_dir / "results.png", dpi=120)
    plt.close("all")
