"""The zero-shot protocol as an anomalib pipeline: ``anomalib zero_shot --config <protocol>.yaml``.

Each prompt-learning model (AnomalyCLIP, FAPrompt) is fitted once on the auxiliary data and then
tested unchanged on every category of every target dataset; zero-shot baselines (WinClip) are
tested directly, and one-class baselines (PatchCore, or any anomalib model) are fitted on each
target category's normal images. Metrics are the papers' four — image AUROC and AP, pixel AUROC
and AUPRO (FPR ≤ 0.3) — computed by anomalib's metrics on the models' *raw* scores and maps
(no normalisation, no thresholds). Results: ``results.csv``, ``results.md`` and ``results.png``
(the means, with AUROC's 50 % chance level), plus heat-maps (:class:`~anomalib_faprompt.visualization.
HeatMapVisualizer`: Image, Gt Mask, Pred Mask, Image + Anomaly Map, each titled). A model whose backbone has
untrained weights, such as the random small CLIP of ``shared/golden``, is named as such below the table, in
the CSV's ``notice`` column, on the chart and on its heat-maps.

The results tree, one level per model, settings, dataset and category::

    <results_dir>/
        results.csv, results.md, results.png, .lock
        <Model>/<fingerprint>/                      e.g. FAPrompt/30a87f716184/
            settings.json, prompts.pt               (prompts only for models whose prompts are learned here)
            rows/<dataset>_<category>-<fingerprint>.json
            weights/lightning/model.ckpt, prompts.pt    the prompt learning's Lightning checkpoint
            <dataset>/<category>/                   e.g. SyntheticAD/disc/: the datamodule's name
                images/<defect>/<image>.png         heat-maps
                weights/lightning/model.ckpt        the tested model (thresholds; a baseline's fit)
                k<k>_s<sampling>/                   few-shot protocol (k > 0): images/, weights/ of that shot

Anomalib's Engine would nest ``<Model>/<Dataset>/<category>/v<N>`` (and a ``latest`` link) inside each folder
on every fit and test; the pipeline's :class:`FolderEngine` writes into the folder itself, as a folder is only
rewritten when its row is recomputed.

Resuming: each model of the config works in its own folder, ``<results_dir>/<Model>/<fingerprint>/``,
where the fingerprint is a hash of the canonical JSON of the *effective* settings its prompts (or, for
a baseline, its results) depend on: the model class and all its init args, defaults included (its
``hparams``), the seed and, when prompts are learned, the auxiliary dataset (class, init args,
categories), ``max_epochs`` and ``train_batch_size``; prompts given as ``prompt_weights`` count by
their file's SHA-256. The folder holds these settings (``settings.json``), the learned prompts
(``prompts.pt``) and one file per target category (``rows/<dataset>_<category>-<fingerprint>.json``)
whose fingerprint adds the target dataset (class and init args), the category, the metrics and the
SHA-256 of the prompts. A rerun reuses exactly the files whose fingerprint matches and computes the
rest, so an interrupted run resumes where it stopped and a run with other settings gets folders and
rows of its own, leaving earlier results as they are. Not in the fingerprints, as they do not change
the numbers: ``num_workers``, ``results_dir``, ``accelerator``, the models' ``visualizer``,
``evaluator`` and ``post_processor`` (the pipeline sets its own) and the auxiliary datasets' batch
sizes (only the top-level ``train_batch_size`` trains), nor ``devices``, ``num_nodes`` and ``strategy`` (the
numbers agree within float rounding, see below). Not detected either: changes to the files
under a dataset's root or to the code; use a new ``results_dir`` after those.

Few-shot protocol: ``k_shot: [0, 1, 2, 4]`` and ``samplings: 5`` add rows per k > 0 and sampling, each with
its own row file (``rows/<dataset>_<category>-k<k>-s<sampling>-<fingerprint>.json``, whose fingerprint adds k,
the reference seed and the reference files), and the table gives mean ± std over the samplings; see
:mod:`~anomalib_faprompt.pipelines.few_shot`. Without them (or with ``k_shot: [0]``) rows and table are the above.

Two variants of one model (e.g. AnomalyCLIP with ``feature_layers: [6, 12, 18, 24]`` and ``[24]``)
are named in the table by the init args that differ, e.g. ``AnomalyCLIP[feature_layers=24]``; a model
listed twice with the same effective settings is refused.

Every result file is written atomically (a temporary file in the same folder, then a rename); a
file left unreadable by an earlier kill is named in a warning, moved aside as
``<name>.corrupt-<time>`` and recomputed. A run holds a lock on ``<results_dir>/.lock`` (``flock``,
released by the system when the process ends, even if killed); a second run into the same folder is
refused with the holder's pid.

Several processes: ``devices: N`` (and ``num_nodes: M`` machines) run every fit and test with Lightning's DDP
(``strategy: ddp``; ``auto`` means it too). Lightning starts the other processes by running the same
command again, so each runs the whole pipeline and takes the same decisions; rank 0 alone holds the lock and writes
the files, and the others read the prompts it wrote (over several machines ``results_dir`` must be on storage they
share). ``train_batch_size`` stays the global batch of prompt learning, divided among the processes (it must be a
multiple of their number), so prompts and metrics are those of one process within float rounding, and evaluation
scores each image once (:mod:`anomalib_faprompt.distributed`). Baselines fitted on a target's normal images
(PatchCore) are refused: run them in a config with ``devices: 1``.

Config (YAML)::

    seed: 0
    accelerator: auto
    devices: 1                             # optional: processes per machine (DDP above 1), and
    num_nodes: 1                           # optional: machines
    max_epochs: 15
    train_batch_size: 8                    # the global batch, over all processes
    eval_batch_size: 8
    num_workers: 4
    results_dir: results/zero_shot
    k_shot: [0, 1, 2, 4]                   # optional, the few-shot protocol (default [0])
    samplings: 5                           # optional, draws of the references per k > 0 (default 1)
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

import contextlib
import copy
import dataclasses
import importlib
import inspect
import itertools
import json
import logging
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from anomalib import LearningType
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.models import AnomalibModule, get_model
from anomalib.pipelines.components.base import Pipeline, Runner
from lightning.pytorch import seed_everything
from matplotlib.figure import Figure

from anomalib_faprompt.callbacks import RunProgressBar
from anomalib_faprompt.cli import settings_errors_in_one_line
from anomalib_faprompt.components.metrics import PAPER_METRICS, paper_evaluator
from anomalib_faprompt.data import AuxiliaryDataModule, SyntheticAD
from anomalib_faprompt.distributed import DistributedSampling, launched_as_rank_zero
from anomalib_faprompt.methods import METHODS, Learning
from anomalib_faprompt.models.prompt_module import PromptLearningMixin
from anomalib_faprompt.visualization import HeatMapVisualizer, untrained_weights_notice

from .few_shot import (
    FEW_SHOT_KEYS,
    Shot,
    check_takes_references,
    plan_references,
    plan_shots,
    reference_use,
    restrict_train_split,
    used_references,
)
from .few_shot_table import few_shot_markdown, is_few_shot, plot_few_shot, summarise_few_shot
from .result_files import (
    ResultsDirLockedError,
    atomic_write,
    canonical,
    file_digest,
    fingerprint,
    read_json,
    readable_prompts,
    remove_temporaries,
    results_dir_lock,
    set_aside,
    write_json,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

METRICS = PAPER_METRICS

#: Part of every row's fingerprint: increase it when rows are computed differently, so that reruns recompute them.
ROW_VERSION = 1

#: The settings of a protocol config.
CONFIG_KEYS = (
    frozenset(
        {
            "seed",
            "accelerator",
            "devices",
            "num_nodes",
            "strategy",
            "max_epochs",
            "train_batch_size",
            "eval_batch_size",
            "num_workers",
            "results_dir",
            "auxiliary",
            "targets",
            "models",
        }
    )
    | FEW_SHOT_KEYS
)

#: Model init args left out of the fingerprints: the pipeline sets its own evaluator and post-processor.
UNFINGERPRINTED_INIT_ARGS = frozenset({"visualizer", "evaluator", "post_processor"})

#: The strategies a run over several processes may use: Lightning's DDP, which starts the other processes by
#: running the same command again, so that every process runs the pipeline.
DISTRIBUTED_STRATEGIES = frozenset({"auto", "ddp"})


# Datasets -----------------------------------------------------------------------------------------------------------


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

    Its :attr:`name` is the datamodule's own (``datamodule.name``: the class name, a ``Folder``'s ``name``
    argument, ``SyntheticAD`` for generated categories): the table's dataset column and the results folder
    use it. Generated datasets (:class:`~anomalib_faprompt.data.SyntheticAD`) write missing categories here.

    Args:
        config: ``{"dataset": {"class_path": ..., "init_args": {...}}, "categories": [...] | "all"}``.
        defaults: Datamodule arguments shared by all datasets (batch sizes, workers).
    """

    def __init__(self, config: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.datamodule_class = _datamodule_class(config["dataset"])
        self.init_args = {**defaults, **config["dataset"].get("init_args", {})}
        self.class_name = self.datamodule_class.__name__
        self.name = self.datamodule_class(**self.init_args).name  # datamodules touch no file when built
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
        if issubclass(self.datamodule_class, SyntheticAD):  # written on first use (or checked against its settings)
            for category in categories:
                self.datamodule_class(**self.init_args, category=category).prepare_data()
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

    def settings(self, ignore: Collection[str] = ("num_workers",)) -> dict[str, Any]:
        """What identifies the data, for fingerprints: datamodule class and init args but those in ``ignore``."""
        init_args = {key: value for key, value in self.init_args.items() if key not in ignore}
        return {"dataset": self.class_name, "init_args": canonical(init_args)}


class FolderEngine(Engine):
    """Anomalib's Engine writing into ``default_root_dir`` itself, with progress bars that say what they run.

    The Engine nests its outputs under ``<default_root_dir>/<Model>/<Dataset>/<category>/v<N>`` (with a ``latest``
    link) on every fit and test. The pipeline names its folders itself, and rewrites one only when its row is
    recomputed, so versions would only nest; like anomalib's tiled-ensemble engine, this one skips that step.

    Its trainer shows a :class:`~anomalib_faprompt.callbacks.RunProgressBar` (``Patchcore · MVTecAD/disc ·
    Testing``) for every model, baselines included (the prompt models put one in place of Lightning's default bar
    themselves), unless ``callbacks`` are given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("callbacks") is None:
            kwargs["callbacks"] = [RunProgressBar()]
        super().__init__(*args, **kwargs)

    def _setup_workspace(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

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


# Models -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelVariant:
    """One entry of the config's ``models`` with the effective settings its results depend on.

    Attributes:
        index: Position in ``models``.
        config: The entry (``class_path``, ``init_args``).
        name: Model class name.
        init_args: Effective init args (the model's ``hparams``, defaults included), as plain JSON values.
        prompt_learning: Whether the model is one of this package's prompt methods (AnomalyCLIP, FAPrompt, PromptAD).
        learns_prompts: Whether the pipeline learns its prompts on the auxiliary data (a method listing
            ``Learning.AUXILIARY``, no ``prompt_weights`` given).
        learns_from_normals: Whether it learns from the target category's normal images, so is built and fitted
            per category (and per k and sampling): anomalib's one-class models, methods listing
            ``Learning.FEW_SHOT_PROMPTS`` without loaded prompts (PromptAD).
        parameters: Its constructor's argument names (which reference settings it takes, see ``few_shot``).
        settings: What its prompts (or, for a baseline, its results) depend on; fingerprinted.
        label: Its name in the table: the class name, plus the init args that differ from the other
            variants of the class in the config.
        notice: What says its backbone has untrained weights (e.g. the random small CLIP), if anything does
            (:func:`~anomalib_faprompt.visualization.untrained_weights_notice`).
    """

    index: int
    config: dict[str, Any]
    name: str
    init_args: dict[str, Any]
    prompt_learning: bool
    learns_prompts: bool
    settings: dict[str, Any]
    learns_from_normals: bool = False
    parameters: frozenset[str] = frozenset()
    label: str = ""
    notice: str | None = None

    @property
    def fingerprint(self) -> str:
        """Fingerprint of :attr:`settings`."""
        return fingerprint(self.settings)

    def folder(self, results_dir: Path) -> Path:
        """Its results folder: ``<results_dir>/<name>/<fingerprint prefix>``."""
        return results_dir / self.name / self.fingerprint[:12]


def _epochs(variant_index: int, name: str, init_args: dict[str, Any], config: dict[str, Any]) -> int:
    """The epochs of prompt learning (the model's ``max_epochs`` if set, else the config's), at least 1."""
    if init_args.get("max_epochs") is not None:
        epochs, source = init_args["max_epochs"], f"models[{variant_index}].init_args.max_epochs"
    else:
        epochs, source = config.get("max_epochs", 15), "max_epochs"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        msg = (
            f"{source} must be an integer of at least 1 to learn {name}'s prompts (got {epochs!r}): without an "
            f"optimiser step the prompts stay random and every score of the table would be meaningless. To test "
            f"prompts learned elsewhere, give them as prompt_weights in the model's init_args."
        )
        raise ValueError(msg)
    return epochs


def _variant(index: int, model_config: dict[str, Any], config: dict[str, Any], auxiliary: DatasetSpec) -> ModelVariant:
    """Build the model once to read its effective init args (``hparams``, defaults included), then let it go."""
    model = get_model(copy.deepcopy(model_config))
    name = type(model).__name__
    init_args = canonical(dict(model.hparams))
    given = model_config.get("init_args") or {}
    init_args |= {key: canonical(value) for key, value in given.items() if key not in init_args}
    init_args = {key: value for key, value in init_args.items() if key not in UNFINGERPRINTED_INIT_ARGS}
    prompt_learning = isinstance(model, PromptLearningMixin)
    method = METHODS.get(name)
    learning = set(method.learning_types) if method is not None else set()
    learns_prompts = prompt_learning and Learning.AUXILIARY in learning and model.prompt_weights is None
    if method is not None:  # PromptAD learns its prompts from the k normal images, unless they were loaded
        learns_from_normals = Learning.FEW_SHOT_PROMPTS in learning and model.prompt_weights is None
    else:
        learns_from_normals = model.learning_type == LearningType.ONE_CLASS
    parameters = frozenset(inspect.signature(type(model)).parameters)
    notice = untrained_weights_notice(model)
    del model
    settings: dict[str, Any] = {"model": name, "init_args": dict(init_args), "seed": config.get("seed", 0)}
    if learns_prompts:
        settings["init_args"].pop("prompt_weights", None)
        settings["init_args"].pop("max_epochs", None)
        settings |= {
            "max_epochs": _epochs(index, name, init_args, config),
            "train_batch_size": config.get("train_batch_size", 8),
            "auxiliary": {
                **auxiliary.settings(ignore=("num_workers", "train_batch_size", "eval_batch_size")),
                "categories": auxiliary.categories,
            },
        }
    elif prompt_learning and init_args.get("prompt_weights"):  # learned elsewhere: the file's content counts
        settings["init_args"]["prompt_weights"] = {"sha256": file_digest(init_args["prompt_weights"])}
        settings["init_args"].pop("max_epochs", None)
    return ModelVariant(index, model_config, name, init_args, prompt_learning, learns_prompts, settings,
                        learns_from_normals, parameters, notice=notice)  # fmt: skip


def _show(value: Any, compact: bool = True) -> str:
    """An init arg's value in a label: strings as they are, one-element lists as their element, else JSON."""
    if compact and isinstance(value, list) and len(value) == 1:
        return _show(value[0], compact)
    if compact and isinstance(value, list):
        return "[" + ",".join(_show(item, compact) for item in value) + "]"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _label(variants: list[ModelVariant]) -> None:
    """Name the variants of one model class by the init args that differ between them."""
    if len(variants) == 1:
        variants[0].label = variants[0].name
        return
    for first, second in itertools.combinations(variants, 2):
        if first.fingerprint == second.fingerprint:
            msg = (
                f"models[{first.index}] and models[{second.index}] are the same {first.name} with the same effective "
                f"settings (defaults included), so they would give the same row twice; remove one."
            )
            raise ValueError(msg)
    keys = sorted({key for variant in variants for key in variant.init_args})
    differing = [key for key in keys if len({json.dumps(v.init_args.get(key), sort_keys=True) for v in variants}) > 1]
    for compact in (True, False):  # the full JSON values if the compact ones coincide (e.g. [24] and 24)
        for variant in variants:
            shown = ", ".join(f"{key}={_show(variant.init_args.get(key), compact)}" for key in differing)
            variant.label = f"{variant.name}[{shown}]"
        if len({variant.label for variant in variants}) == len(variants):
            return


def plan_models(config: dict[str, Any], auxiliary: DatasetSpec, shots: list[Shot] | None = None) -> list[ModelVariant]:
    """The config's models with their effective settings and table labels.

    Raises:
        ValueError: If prompts would be learned with ``max_epochs`` below 1, a model is listed twice with the
            same effective settings, or ``shots`` have k > 0 and a model cannot take references
            (:func:`~anomalib_faprompt.pipelines.few_shot.check_takes_references`).
    """
    variants = [_variant(index, model, config, auxiliary) for index, model in enumerate(config["models"])]
    if any(shot.k for shot in shots or ()):
        for variant in variants:
            given = variant.config.get("init_args") or {}
            check_takes_references(variant.index, variant.name, variant.parameters, variant.learns_from_normals, given)
    by_name: dict[str, list[ModelVariant]] = {}
    for variant in variants:
        by_name.setdefault(variant.name, []).append(variant)
    for same_class in by_name.values():
        _label(same_class)
    return variants


def engine_arguments(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The trainer settings of every fit and test of a run, and the number of processes each runs in.

    Raises:
        ValueError: For ``devices`` or ``num_nodes`` that are not whole numbers of at least 1, or several processes
            with a strategy other than those of :data:`DISTRIBUTED_STRATEGIES`.
    """
    devices, num_nodes = config.get("devices", 1), config.get("num_nodes", 1)
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} must be a whole number of at least 1 (processes per machine, machines), got {value!r}."
            raise ValueError(msg)
    strategy = config.get("strategy", "auto")
    processes = devices * num_nodes
    if processes > 1 and strategy not in DISTRIBUTED_STRATEGIES:
        msg = (
            f"strategy {strategy!r} cannot run zero_shot over devices x num_nodes = {processes} processes; use "
            f"strategy: ddp, which runs the whole pipeline in every process (rank 0 writing the files)."
        )
        raise ValueError(msg)
    if processes > 1:
        strategy = "ddp"  # what "auto" chooses too, but in an interactive session (ddp_fork)
    arguments = {"accelerator": config.get("accelerator", "auto"), "devices": devices, "num_nodes": num_nodes}
    return arguments | {"strategy": strategy}, processes


def check_distributed(variants: list[ModelVariant], config: dict[str, Any], processes: int) -> None:
    """Refuse, before any work, what a run over several processes cannot compute as one process does.

    Raises:
        ValueError: For a ``train_batch_size`` (the global batch of prompt learning) that the processes cannot
            share evenly, or an anomalib baseline fitted on the target's normal images.
    """
    if processes == 1:
        return
    batch = config.get("train_batch_size", 8)
    if batch % processes and any(variant.learns_prompts for variant in variants):
        msg = (
            f"train_batch_size {batch} is the global batch of prompt learning, shared by devices x num_nodes = "
            f"{processes} processes: make it a multiple of {processes}, so that each process takes as many images."
        )
        raise ValueError(msg)
    for variant in variants:
        if variant.learns_from_normals and not variant.prompt_learning:
            msg = (
                f"models[{variant.index}] ({variant.name}) is fitted on each target category's normal images, which "
                f"zero_shot does not run over {processes} processes: anomalib's baselines do not gather what they "
                "fit (PatchCore's memory bank would hold each process's shard of the images only). Run it in a "
                "config of its own with devices: 1 and num_nodes: 1 (the same results_dir is fine)."
            )
            raise ValueError(msg)


def _load_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        config = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        msg = f"Unknown zero_shot settings {unknown}; the settings are {sorted(CONFIG_KEYS)}."
        raise ValueError(msg)
    missing = [key for key in ("auxiliary", "targets", "models") if not config.get(key)]
    if missing:
        msg = f"The zero_shot config needs {missing} (see `anomalib_faprompt.pipelines.zero_shot` for an example)."
        raise ValueError(msg)
    return config


class ZeroShot(Pipeline):
    """Fit zero-shot models once on auxiliary data, test them on every target category, tabulate."""

    def _setup_runners(self, args: dict) -> list[Runner]:
        del args
        return []

    def run(self, args: Any = None) -> pd.DataFrame:
        """Run from CLI arguments (a namespace with ``config``); a bad config ends it with one ``error:`` line."""
        with settings_errors_in_one_line(ResultsDirLockedError):
            return self.run_config(self._get_args(args))

    def run_config(self, config: dict[str, Any] | str | Path) -> pd.DataFrame:
        """Run the protocol described by a config dict or YAML file; returns the results table.

        Raises:
            ResultsDirLockedError: If another run is writing into the config's ``results_dir``.
            ValueError: For a bad config (unknown settings or categories, ``max_epochs`` below 1, ``k_shot`` above a
                category's normal images, …).
        """
        config = _load_config(config)
        shots = plan_shots(config)
        seed = config.get("seed", 0)
        seed_everything(seed, workers=True)
        defaults = {
            "train_batch_size": config.get("train_batch_size", 8),
            "eval_batch_size": config.get("eval_batch_size", 8),
            "num_workers": config.get("num_workers", 4),
        }
        auxiliary = DatasetSpec(config["auxiliary"], defaults)
        targets = [DatasetSpec(target, defaults) for target in config["targets"]]
        references = plan_references(targets, shots)
        results_dir = Path(config.get("results_dir", "results/zero_shot"))
        engine_args, processes = engine_arguments(config)
        writer = processes == 1 or launched_as_rank_zero()

        # Planned and checked before the lock: a refused config leaves no folder behind.
        variants = plan_models(config, auxiliary, shots)
        check_distributed(variants, config, processes)
        with results_dir_lock(results_dir) if writer else contextlib.nullcontext():
            if writer:
                remove_temporaries(results_dir)
            rows = []
            for variant in variants:
                run = _ModelRun(
                    variant, results_dir, auxiliary, targets, engine_args, defaults, seed, shots, references,
                    processes=processes, writer=writer,
                )  # fmt: skip
                rows.extend(run.rows())
            table = summarise(pd.DataFrame(rows))
            if writer:
                write_results(table, results_dir)
        if not writer:
            return table
        print(f"\nZero-shot results (raw scores and maps), written to {results_dir}:\n")
        print(to_markdown(table))
        print("\nFolders (settings.json, prompts.pt, rows, heat-maps):")
        for variant in variants:
            print(f"  {variant.label}: {variant.folder(results_dir)}")
        return table


@dataclasses.dataclass
class _ModelRun:
    """One model of a run: its prompts (resumed or learned) and its rows (resumed or computed)."""

    variant: ModelVariant
    results_dir: Path
    auxiliary: DatasetSpec
    targets: list[DatasetSpec]
    engine_args: dict[str, Any]
    defaults: dict[str, Any]
    seed: int
    shots: list[Shot] = dataclasses.field(default_factory=lambda: [Shot(0, 0, None)])
    references: dict[tuple[str, str, Shot], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: Processes every fit and test runs in (``devices`` x ``num_nodes``).
    processes: int = 1
    #: Whether this process writes the files (rank 0; the others compute the same and read them).
    writer: bool = True

    def __post_init__(self) -> None:
        self.folder = self.variant.folder(self.results_dir)
        self.model: AnomalibModule | None = None
        self._model_shot: Shot | None = None

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per shot and target category, from its file when the same settings made it, else computed now.

        A method that scores only with references (PromptAD: ``Learning.FEW_SHOT_PROMPTS``) has no k = 0 rows.
        """
        self._claim_folder()
        prompts = self._prompts() if self.variant.learns_prompts else None
        prompts_digest = file_digest(prompts) if prompts is not None else None
        method = METHODS.get(self.variant.name)
        # A method that cannot score without references (neither zero-shot nor auxiliary learning: PromptAD).
        needs_references = method is not None and not {Learning.ZERO_SHOT, Learning.AUXILIARY} & set(
            method.learning_types
        )
        for shot in self.shots:
            if needs_references and not shot.k:
                continue
            for target in self.targets:
                for category in target.categories:
                    files = self.references.get((target.name, category, shot), ())
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
                    yield {"model": self.variant.label, "dataset": target.name, "category": category,
                           "k": shot.k, "sampling": shot.sampling, **metrics,
                           "notice": self.variant.notice or ""}  # fmt: skip

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
                write_json(row_file, content | {"dataset": target.name, "category": category, "metrics": metrics})
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
        if not isinstance(metrics, dict) or not all(isinstance(metrics.get(name), int | float) for name in METRICS):
            if self.writer:
                set_aside(row_file, f"expected the metrics {list(METRICS)}")
            return None
        if content["fingerprint"] != key:
            msg = f"'{row_file}' holds a row of other settings (fingerprint {content['fingerprint']}, expected {key})."
            raise ValueError(msg)
        logger.info("Resuming: %s on %s from %s", self.variant.label, content.get("category"), row_file)
        return {name: float(metrics[name]) for name in METRICS}

    def _prompts(self) -> Path:
        """The learned prompts: resumed when a readable file is there, otherwise learned now.

        Over several processes each learns on its share of every global batch (``train_batch_size`` divided among
        them) and rank 0 writes the file, which the others then read.
        """
        prompts = self.folder / "prompts.pt"
        if readable_prompts(prompts, repair=self.writer):
            logger.info("Resuming: %s prompts already learned at %s", self.variant.label, prompts)
            return prompts
        seed_everything(self.seed, workers=True, verbose=False)  # the same prompts whichever models ran before
        model = get_model(copy.deepcopy(self.variant.config))
        first_target = self.targets[0]
        datamodule = AuxiliaryDataModule(
            [self.auxiliary.datamodule(category) for category in self.auxiliary.categories],
            first_target.datamodule(first_target.categories[0]),
            **{**self.defaults, "train_batch_size": self.defaults["train_batch_size"] // self.processes},
        )
        epochs = self.variant.settings["max_epochs"]
        engine = FolderEngine(max_epochs=epochs, default_root_dir=self.folder, **self.engine_args)
        engine.fit(model, datamodule=datamodule)
        if not bool(model.model.prompts_ready):
            msg = (
                f"{self.variant.label}: prompt learning on {self.auxiliary.name} {self.auxiliary.categories} made no "
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
            restrict_train_split(datamodule, self.references[target.name, category, shot])
        if self.variant.prompt_learning and not self.variant.learns_from_normals:
            evaluated = self._shared_model(prompts, shot, use.init_args)
        else:  # PatchCore fits on the category's normals (or the k references), WinClip takes its name
            seed_everything(self.seed, workers=True, verbose=False)
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
        sharded = self.processes > 1 and not self.variant.prompt_learning
        callbacks = [RunProgressBar(), DistributedSampling()] if sharded else None
        engine = FolderEngine(default_root_dir=folder, callbacks=callbacks, **self.engine_args)
        if evaluated.learning_type == LearningType.ONE_CLASS or self.variant.learns_from_normals:
            engine.fit(evaluated, datamodule=datamodule)
            metrics = engine.test_after_fit(evaluated, datamodule)[0]
        else:
            metrics = engine.test(evaluated, datamodule=datamodule, verbose=False)[0]
        if shot.k:
            self._check_references(used_references(evaluated, datamodule, use), target, category, shot)
        return {name: float(metrics[name]) for name in METRICS}

    def _check_references(self, used: list[str] | None, target: DatasetSpec, category: str, shot: Shot) -> None:
        planned = list(self.references[target.name, category, shot])
        if used is None or sorted(used) != sorted(planned):  # a train split is kept sorted by anomalib
            msg = (
                f"{self.variant.label} on {target.name}/{category} (k={shot.k}, sampling {shot.sampling}) took its "
                f"references from {used}, not the protocol's {planned}; its row would not compare with the others'."
            )
            raise RuntimeError(msg)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-category rows plus, per model, the mean over all target categories; ``notice`` names untrained weights.

    Rows of a few-shot run (k > 0) give the few-shot table instead: mean ± std over the samplings per model,
    category and k (:func:`~anomalib_faprompt.pipelines.few_shot_table.summarise_few_shot`).
    """
    if is_few_shot(rows):
        return summarise_few_shot(rows, METRICS)
    if "notice" not in rows:
        rows = rows.assign(notice="")
    means = rows.groupby("model", sort=False).agg({**dict.fromkeys(METRICS, "mean"), "notice": "first"}).reset_index()
    means["dataset"], means["category"] = "mean", "mean"
    return pd.concat([rows, means], ignore_index=True)[["model", "dataset", "category", *METRICS, "notice"]]


UNTRAINED_WEIGHTS_NOTE = (
    "Untrained weights: these models' numbers show the pipeline working, not the methods' accuracy."
)


def notices(table: pd.DataFrame) -> list[str]:
    """``"<model>: <notice>"`` for each model whose weights are untrained, in table order."""
    if "notice" not in table:
        return []
    named = table.drop_duplicates("model").fillna({"notice": ""})
    return [f"{row.model}: {row.notice}" for row in named.itertuples(index=False) if row.notice]


def _zero_shot_markdown(table: pd.DataFrame) -> list[str]:
    lines = ["| model | dataset | category | " + " | ".join(METRICS) + " |", "|" + "---|" * (3 + len(METRICS))]
    for row in table.itertuples(index=False):
        values = " | ".join(f"{100 * getattr(row, name):.1f}" for name in METRICS)
        lines.append(f"| {row.model} | {row.dataset} | {row.category} | {values} |")
    return lines


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table with metrics in percent, followed by the models with untrained weights, if any.

    A few-shot table has a ``k`` column and ``mean ± std`` (over the samplings) values for k > 0.
    """
    lines = few_shot_markdown(table, METRICS) if is_few_shot(table) else _zero_shot_markdown(table)
    if noted := notices(table):
        lines += ["", UNTRAINED_WEIGHTS_NOTE, *(f"- {note}" for note in noted)]
    return "\n".join(lines)


def results_figure(table: pd.DataFrame) -> Figure:
    """Bar chart of each model's means, with AUROC's chance level (50 %) and the models with untrained weights.

    A few-shot table gives one panel per metric instead: each model's mean against k, with ± std bars.

    Example:
        >>> results_figure(table).savefig("results.png")  # doctest: +SKIP
    """
    noted = notices(table)
    few_shot = is_few_shot(table)
    figure = Figure(figsize=(16 if few_shot else 9.5, 4 + 0.2 * (len(noted) + 1) * bool(noted)))
    if few_shot:
        plot_few_shot(figure, table, METRICS)
    else:
        axes = figure.add_subplot()
        means = table[table.category == "mean"].set_index("model")[list(METRICS)] * 100
        means.T.plot.bar(ax=axes, rot=0, ylim=(0, 100), ylabel="%", title="Zero-shot, mean over targets")
        axes.axhline(50, color="0.3", linestyle="--", linewidth=1, label="AUROC chance level (50 %)")
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    bottom = 0.0
    if noted:
        lines = [UNTRAINED_WEIGHTS_NOTE, *noted]
        bottom = (0.2 * len(lines) + 0.1) / figure.get_figheight()
        figure.text(0.01, 0.01, "\n".join(lines), fontsize=8, color="darkred", va="bottom")
    figure.tight_layout(rect=(0, bottom, 0.88 if few_shot else 1, 0.95 if few_shot else 1))
    return figure


def write_results(table: pd.DataFrame, results_dir: Path) -> None:
    """Write ``results.csv``, ``results.md`` and the chart of the means, ``results.png`` (each atomically)."""
    markdown = to_markdown(table) + "\n"
    atomic_write(results_dir / "results.csv", lambda path: table.to_csv(path, index=False))
    atomic_write(results_dir / "results.md", lambda path: path.write_text(markdown, encoding="utf-8"))
    figure = results_figure(table)
    atomic_write(results_dir / "results.png", lambda path: figure.savefig(path, dpi=120, format="png"))
