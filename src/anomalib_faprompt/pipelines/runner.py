"""Run one model of a ``zero_shot`` protocol: its prompts (resumed or learned) and its rows (resumed or computed).

Each model works in its own folder, ``<results_dir>/<Model>/<fingerprint>/`` (:mod:`.planner`): the prompts it
learned (``prompts.pt``), one file per target category and shot (``rows/``), heat-maps and checkpoints below. A
file whose fingerprint matches is reused; an unreadable or damaged one is set aside and recomputed. Over several
processes every process computes the same and rank 0 writes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib import LearningType
from anomalib.data import AnomalibDataModule
from anomalib.models import AnomalibModule, get_model
from lightning.pytorch import seed_everything

from anomalib_faprompt.callbacks import RunProgressBar
from anomalib_faprompt.compat import EngineWithoutVersionFolders
from anomalib_faprompt.components.metrics import PAPER_METRICS, paper_evaluator
from anomalib_faprompt.data import AuxiliaryDataModule
from anomalib_faprompt.distributed import DistributedSampling
from anomalib_faprompt.methods import Learning
from anomalib_faprompt.visualization import HeatMapVisualizer

from .datasets import DatasetSpec
from .few_shot import Shot, reference_use, restrict_train_split, used_references
from .planner import ModelVariant

if TYPE_CHECKING:
    from .zero_shot import RunPlan
from .result_files import (
    atomic_write,
    file_digest,
    fingerprint,
    read_json,
    readable_prompts,
    remove_temporaries,
    set_aside,
    write_json,
)

logger = logging.getLogger(__name__)

METRICS = PAPER_METRICS

#: Part of every row's fingerprint: increase it when rows are computed differently, so that reruns recompute them.
#: 2: undefined metrics (a category without normal or anomalous test images) are NaN, where version 1 wrote 0.0.
ROW_VERSION = 2


class FolderEngine(EngineWithoutVersionFolders):
    """Anomalib's Engine writing into ``default_root_dir`` itself, with progress bars that say what they run.

    The Engine nests its outputs under ``<default_root_dir>/<Model>/<Dataset>/<category>/v<N>`` (with a ``latest``
    link) on every fit and test. The pipeline names its folders itself, and rewrites one only when its row is
    recomputed, so versions would only nest (:class:`~anomalib_faprompt.compat.EngineWithoutVersionFolders`).

    Its trainer shows a :class:`~anomalib_faprompt.callbacks.RunProgressBar` (``Patchcore · MVTecAD/disc ·
    Testing``) for every model, baselines included (the prompt models put one in place of Lightning's default bar
    themselves), unless ``callbacks`` are given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("callbacks") is None:
            kwargs["callbacks"] = [RunProgressBar()]
        super().__init__(*args, **kwargs)

    def test_after_fit(self, model: AnomalibModule, datamodule: AnomalibDataModule) -> list[dict[str, float]]:
        """Test ``model`` on the trainer that fitted it, without Lightning's note about its own callbacks.

        The fit attached the model's components (pre-processor, evaluator, visualiser); the test attaches the same
        objects again, and Lightning would say that they "will override existing callbacks passed to Trainer",
        a note meant for callbacks the user passed. They are taken out of the trainer's list first.
        """
        own = model.configure_callbacks()
        own_ids = {id(callback) for callback in (own if isinstance(own, list | tuple) else [own])}
        self.trainer.callbacks = [callback for callback in self.trainer.callbacks if id(callback) not in own_ids]
        return self.test(model, datamodule=datamodule, verbose=False)


class ModelRun:
    """One model of a run: its prompts (resumed or learned) and its rows (resumed or computed).

    Args:
        plan: The run's plan (:class:`~anomalib_faprompt.pipelines.zero_shot.RunPlan`): data, shots, references,
            trainer settings, and whether this process writes the files.
        variant: The model, one of ``plan.variants``.
    """

    def __init__(self, plan: RunPlan, variant: ModelVariant) -> None:
        self.plan = plan
        self.variant = variant
        self.folder = variant.folder(plan.results_dir)
        #: (dataset name, category) of targets that are also auxiliary categories of its prompts (``allow_overlap``).
        self.overlap = plan.overlap if variant.learns_prompts else set()
        self.model: AnomalibModule | None = None
        self._model_shot: Shot | None = None

    @property
    def writer(self) -> bool:
        """Whether this process writes the files (rank 0; the others compute the same and read them)."""
        return self.plan.writer

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per shot and target category, from its file when the same settings made it, else computed now.

        A method that scores only with references (PromptAD: ``Learning.FEW_SHOT_PROMPTS``) has no k = 0 rows.
        """
        self._claim_folder()
        prompts = self._prompts() if self.variant.learns_prompts else None
        prompts_digest = file_digest(prompts) if prompts is not None else None
        # A method that cannot score without references (neither zero-shot nor auxiliary learning: PromptAD).
        needs_references = self.variant.prompt_learning and not {Learning.ZERO_SHOT, Learning.AUXILIARY} & set(
            self.variant.learning_types
        )
        for shot in self.plan.shots:
            if needs_references and not shot.k:
                continue
            for target in self.plan.targets:
                for category in target.categories:
                    files = self.plan.references.get((target.name, category, shot), ())
                    settings = {
                        "model": self.variant.fingerprint,
                        "prompts_sha256": prompts_digest,
                        "target": target.settings(),
                        "category": category,
                        "metrics": list(METRICS),
                        "version": ROW_VERSION,
                        **shot.row_settings(files),
                    }
                    metrics = self._row_metrics(target, category, prompts, shot, settings)
                    marked = {"auxiliary_overlap": (target.name, category) in self.overlap} if self.overlap else {}
                    yield {"model": self.variant.label, "dataset": target.name, "category": category,
                           "k": shot.k, "sampling": shot.sampling, **metrics,
                           "notice": self.variant.notice or "", **marked}  # fmt: skip

    def _row_metrics(
        self, target: DatasetSpec, category: str, prompts: Path | None, shot: Shot, settings: dict[str, Any]
    ) -> dict[str, float]:
        """One row's metrics: from its file when one with this fingerprint exists, else computed and written."""
        key = fingerprint(settings)
        row_file = self.folder / "rows" / f"{target.name}_{category}{shot.suffix}-{key[:12]}.json"
        metrics = self._cached_metrics(row_file, key)
        if metrics is None:
            metrics = self._evaluate(target, category, prompts, shot)
            content = {"fingerprint": key, "settings": settings, "model": self.variant.label}
            if self.writer:
                stored = {name: None if math.isnan(value) else value for name, value in metrics.items()}  # JSON: null
                write_json(row_file, content | {"dataset": target.name, "category": category, "metrics": stored})
        return metrics

    def _claim_folder(self) -> None:
        """Record the settings in ``settings.json``, or check that the folder's are these."""
        if self.writer:
            for folder in (self.folder, self.folder / "rows"):
                remove_temporaries(folder)
        path = self.folder / "settings.json"
        content = read_json(path, required=("fingerprint",), repair=self.writer)
        if content is None:
            if self.writer:
                write_json(path, {"model": self.variant.name, "fingerprint": self.variant.fingerprint,
                                   "settings": self.variant.settings})  # fmt: skip
        elif content["fingerprint"] != self.variant.fingerprint:
            msg = (
                f"'{path}' records other settings than {self.variant.label}'s (fingerprint {content['fingerprint']}, "
                f"expected {self.variant.fingerprint}), so the folder's prompts and rows are not this model's. "
                f"Move the folder away or use another results_dir."
            )
            raise ValueError(msg)

    def _cached_metrics(self, row_file: Path, key: str) -> dict[str, float] | None:
        content = read_json(row_file, required=("fingerprint", "metrics"), repair=self.writer)
        if content is None:
            return None
        metrics = content["metrics"]
        stored = (int, float, type(None))  # None: undefined on that category (NaN)
        if not isinstance(metrics, dict) or not all(name in metrics and isinstance(metrics[name], stored)
                                                    for name in METRICS):  # fmt: skip
            if self.writer:
                set_aside(row_file, f"expected the metrics {list(METRICS)}")
            return None
        if content["fingerprint"] != key:
            msg = f"'{row_file}' holds a row of other settings (fingerprint {content['fingerprint']}, expected {key})."
            raise ValueError(msg)
        logger.info("Resuming: %s on %s from %s", self.variant.label, content.get("category"), row_file)
        return {name: float("nan") if metrics[name] is None else float(metrics[name]) for name in METRICS}

    def _prompts(self) -> Path:
        """The learned prompts: resumed when a readable file is there, otherwise learned now.

        Over several processes each learns on its share of every global batch (``train_batch_size`` divided among
        them) and rank 0 writes the file, which the others then read.
        """
        prompts = self.folder / "prompts.pt"
        if readable_prompts(prompts, repair=self.writer):
            logger.info("Resuming: %s prompts already learned at %s", self.variant.label, prompts)
            return prompts
        # The same prompts whichever models ran before.
        seed_everything(self.plan.config.seed, workers=True, verbose=False)
        model = get_model(copy.deepcopy(self.variant.config))
        auxiliary = self.plan.auxiliary
        first_target = self.plan.targets[0]
        defaults = self.plan.config.datamodule_defaults
        datamodule = AuxiliaryDataModule(
            [auxiliary.datamodule(category) for category in auxiliary.categories],
            first_target.datamodule(first_target.categories[0]),
            **{**defaults, "train_batch_size": defaults["train_batch_size"] // self.plan.processes},
        )
        epochs = self.variant.settings["max_epochs"]
        engine = FolderEngine(max_epochs=epochs, default_root_dir=self.folder, **self.plan.engine_args)
        engine.fit(model, datamodule=datamodule)
        if not bool(model.model.prompts_ready):
            msg = (
                f"{self.variant.label}: prompt learning on {auxiliary.name} {auxiliary.categories} made no "
                f"optimiser step (max_epochs={epochs}), so its prompts are untrained; nothing was saved. Check "
                f"max_epochs and that the auxiliary categories hold anomalous images with masks."
            )
            raise RuntimeError(msg)
        if self.writer:
            atomic_write(prompts, model.save_prompt_weights)
        engine.trainer.strategy.barrier("zero_shot prompts")  # the file is complete before anyone reads it
        if not prompts.is_file():
            msg = (
                f"{prompts}, written by rank 0, is not visible to this process: over several machines the "
                f"results_dir must be on storage they all share."
            )
            raise FileNotFoundError(msg)
        return prompts

    def _shared_model(self, prompts: Path | None, shot: Shot, init_args: dict[str, Any]) -> AnomalibModule:
        """The prompt model of all categories of one shot (built again, with the same prompts, for another shot)."""
        if self.model is None or self._model_shot != shot:
            extra = {"prompt_weights": str(prompts)} if prompts is not None else {}
            self.model = get_model(copy.deepcopy(self.variant.config), **extra, **init_args)
            self._model_shot = shot
        return self.model

    def _evaluate(self, target: DatasetSpec, category: str, prompts: Path | None, shot: Shot) -> dict[str, float]:
        """Test one target category; a baseline is built (and a one-class one fitted) afresh for each category.

        With k > 0 the model gets the shot's references (:func:`~anomalib_faprompt.pipelines.few_shot.
        reference_use`), and the files it took them from are checked against the planned ones.
        """
        datamodule = target.datamodule(category)
        use = reference_use(self.variant.parameters, self.variant.learns_from_normals, shot)
        if use.restrict_train_split:
            restrict_train_split(datamodule, self.plan.references[target.name, category, shot])
        if self.variant.prompt_learning and not self.variant.learns_from_normals:
            evaluated = self._shared_model(prompts, shot, use.init_args)
        else:  # PatchCore fits on the category's normals (or the k references), WinClip takes its name
            seed_everything(self.plan.config.seed, workers=True, verbose=False)
            evaluated = get_model(copy.deepcopy(self.variant.config), **use.init_args)
        # Metrics on raw scores and maps. The prompt models compute them before their post-processor, which stays
        # to give the heat-maps their [0, 1] range (AnomalyCLIP's raw map sums one probability per feature layer,
        # which image conversion would wrap past 1); baselines run without one, as anomalib scores after it. Set
        # before a one-class fit: the engine's trainer keeps the fit's callbacks, a post-processor included.
        if not self.variant.prompt_learning:
            evaluated.post_processor = None
        evaluated.evaluator = paper_evaluator()
        if evaluated.visualizer is not None:  # a fresh one: a visualiser keeps the folder of its first run
            evaluated.visualizer = HeatMapVisualizer(notice=self.variant.notice)
        folder = self.folder / target.name / category / (f"k{shot.k}_s{shot.sampling}" if shot.k else "")
        # A baseline gets the unrepeated evaluation shards that the prompt models bring along themselves.
        sharded = self.plan.processes > 1 and not self.variant.prompt_learning
        callbacks = [RunProgressBar(), DistributedSampling()] if sharded else None
        engine = FolderEngine(default_root_dir=folder, callbacks=callbacks, **self.plan.engine_args)
        if evaluated.learning_type == LearningType.ONE_CLASS or self.variant.learns_from_normals:
            engine.fit(evaluated, datamodule=datamodule)
            metrics = engine.test_after_fit(evaluated, datamodule)[0]
        else:
            metrics = engine.test(evaluated, datamodule=datamodule, verbose=False)[0]
        if shot.k:
            self._check_references(used_references(evaluated, datamodule, use), target, category, shot)
        return {name: float(metrics[name]) for name in METRICS}

    def _check_references(self, used: list[str] | None, target: DatasetSpec, category: str, shot: Shot) -> None:
        planned = list(self.plan.references[target.name, category, shot])
        if used is None or sorted(used) != sorted(planned):  # a train split is kept sorted by anomalib
            msg = (
                f"{self.variant.label} on {target.name}/{category} (k={shot.k}, sampling {shot.sampling}) took its "
                f"references from {used}, not the protocol's {planned}; its row would not compare with the others'."
            )
            raise RuntimeError(msg)
