"""Plan a ``zero_shot`` run: each model's effective settings, fingerprint and label; the trainer's settings.

Each model of the config is built once to read its effective init args (``hparams``, defaults included): what its
prompts (or, for a baseline, its results) depend on is fingerprinted (:class:`ModelVariant`), so a rerun resumes
exactly what the same settings made. Two variants of one model are named in the table by the init args that
differ; the same model twice is refused. The trainer settings of every fit and test come from ``devices``,
``num_nodes`` and ``strategy``, and what a run over several processes cannot compute as one process does is refused
before any work.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

from anomalib import LearningType
from anomalib.models import get_model

from anomalib_faprompt.methods import Learning
from anomalib_faprompt.models.base import PromptMethod
from anomalib_faprompt.signatures import constructor_parameters
from anomalib_faprompt.visualization import untrained_weights_notice

from .config import ZeroShotConfig
from .datasets import DatasetSpec
from .few_shot import Shot, check_takes_references
from .result_files import canonical, file_digest, fingerprint

#: Model init args left out of the fingerprints: the pipeline sets its own evaluator and post-processor.
UNFINGERPRINTED_INIT_ARGS = frozenset({"visualizer", "evaluator", "post_processor"})

#: The strategies a run over several processes may use: Lightning's DDP, which starts the other processes by
#: running the same command again, so that every process runs the pipeline.
DISTRIBUTED_STRATEGIES = frozenset({"auto", "ddp"})


@dataclasses.dataclass
class ModelVariant:
    """One entry of the config's ``models`` with the effective settings its results depend on.

    Attributes:
        index: Position in ``models``.
        config: The entry (``class_path``, ``init_args``).
        name: Model class name.
        init_args: Effective init args (the model's ``hparams``, defaults included), as plain JSON values.
        prompt_learning: Whether the model is a prompt method (``PromptMethod``: built in or registered).
        learns_prompts: Whether the pipeline learns its prompts on the auxiliary data (a method listing
            ``Learning.AUXILIARY``, no ``prompt_weights`` given).
        learns_from_normals: Whether it learns from the target category's normal images, so is built and fitted
            per category (and per k and sampling): anomalib's one-class models, methods listing
            ``Learning.FEW_SHOT_PROMPTS`` without loaded prompts (PromptAD).
        parameters: Its constructor's argument names (which reference settings it takes, see ``few_shot``).
        learning_types: What a prompt method learns from (its class's ``learning_types``); empty for baselines.
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
    learning_types: tuple[Learning, ...] = ()
    label: str = ""
    notice: str | None = None

    @property
    def fingerprint(self) -> str:
        """Fingerprint of :attr:`settings`."""
        return fingerprint(self.settings)

    def folder(self, results_dir: Path) -> Path:
        """Its results folder: ``<results_dir>/<name>/<fingerprint prefix>``."""
        return results_dir / self.name / self.fingerprint[:12]


def _epochs(variant_index: int, name: str, init_args: dict[str, Any], config: ZeroShotConfig) -> int:
    """The epochs of prompt learning (the model's ``max_epochs`` if set, else the config's), at least 1."""
    if init_args.get("max_epochs") is not None:
        epochs, source = init_args["max_epochs"], f"models[{variant_index}].init_args.max_epochs"
    else:
        epochs, source = config.max_epochs, "max_epochs"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        msg = (
            f"{source} must be an integer of at least 1 to learn {name}'s prompts (got {epochs!r}): without an "
            f"optimiser step the prompts stay random and every score of the table would be meaningless. To test "
            f"prompts learned elsewhere, give them as prompt_weights in the model's init_args."
        )
        raise ValueError(msg)
    return epochs


def _variant(index: int, model_config: dict[str, Any], config: ZeroShotConfig, auxiliary: DatasetSpec) -> ModelVariant:
    """Build the model once to read its effective init args (``hparams``, defaults included), then let it go."""
    model = get_model(copy.deepcopy(model_config))
    name = type(model).__name__
    init_args = canonical(dict(model.hparams))
    given = model_config.get("init_args") or {}
    init_args |= {key: canonical(value) for key, value in given.items() if key not in init_args}
    init_args = {key: value for key, value in init_args.items() if key not in UNFINGERPRINTED_INIT_ARGS}
    prompt_learning = isinstance(model, PromptMethod)
    learning = set(getattr(model, "learning_types", ()))
    learns_prompts = prompt_learning and Learning.AUXILIARY in learning and model.prompt_weights is None
    if prompt_learning:  # PromptAD learns its prompts from the k normal images, unless they were loaded
        learns_from_normals = Learning.FEW_SHOT_PROMPTS in learning and model.prompt_weights is None
    else:
        learns_from_normals = model.learning_type == LearningType.ONE_CLASS
    parameters = frozenset(constructor_parameters(type(model)))
    notice = untrained_weights_notice(model)
    del model
    settings: dict[str, Any] = {"model": name, "init_args": dict(init_args), "seed": config.seed}
    if learns_prompts:
        settings["init_args"].pop("prompt_weights", None)
        settings["init_args"].pop("max_epochs", None)
        settings |= {
            "max_epochs": _epochs(index, name, init_args, config),
            "train_batch_size": config.train_batch_size,
            "auxiliary": {
                **auxiliary.settings(ignore=("num_workers", "train_batch_size", "eval_batch_size")),
                "categories": auxiliary.categories,
            },
        }
    elif prompt_learning and init_args.get("prompt_weights"):  # learned elsewhere: the file's content counts
        settings["init_args"]["prompt_weights"] = {"sha256": file_digest(init_args["prompt_weights"])}
        settings["init_args"].pop("max_epochs", None)
    return ModelVariant(index, model_config, name, init_args, prompt_learning, learns_prompts, settings,
                        learns_from_normals, parameters, tuple(learning), notice=notice)  # fmt: skip


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


def plan_models(config: ZeroShotConfig, auxiliary: DatasetSpec, shots: list[Shot] | None = None) -> list[ModelVariant]:
    """The config's models with their effective settings and table labels.

    Raises:
        ValueError: If prompts would be learned with ``max_epochs`` below 1, a model is listed twice with the
            same effective settings, or ``shots`` have k > 0 and a model cannot take references
            (:func:`~anomalib_faprompt.pipelines.few_shot.check_takes_references`).
    """
    variants = [_variant(index, model, config, auxiliary) for index, model in enumerate(config.models)]
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


def engine_arguments(config: ZeroShotConfig) -> tuple[dict[str, Any], int]:
    """The trainer settings of every fit and test of a run, and the number of processes each runs in.

    Raises:
        ValueError: For ``devices`` or ``num_nodes`` that are not whole numbers of at least 1, or several processes
            with a strategy other than those of :data:`DISTRIBUTED_STRATEGIES`.
    """
    devices, num_nodes = config.devices, config.num_nodes
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} must be a whole number of at least 1 (processes per machine, machines), got {value!r}."
            raise ValueError(msg)
    strategy = config.strategy
    processes = devices * num_nodes
    if processes > 1 and strategy not in DISTRIBUTED_STRATEGIES:
        msg = (
            f"strategy {strategy!r} cannot run zero_shot over devices x num_nodes = {processes} processes; use "
            f"strategy: ddp, which runs the whole pipeline in every process (rank 0 writing the files)."
        )
        raise ValueError(msg)
    if processes > 1:
        strategy = "ddp"  # what "auto" chooses too, but in an interactive session (ddp_fork)
    arguments = {"accelerator": config.accelerator, "devices": devices, "num_nodes": num_nodes}
    return arguments | {"strategy": strategy}, processes


def check_distributed(variants: list[ModelVariant], config: ZeroShotConfig, processes: int) -> None:
    """Refuse, before any work, what a run over several processes cannot compute as one process does.

    Raises:
        ValueError: For a ``train_batch_size`` (the global batch of prompt learning) that the processes cannot
            share evenly, or an anomalib baseline fitted on the target's normal images.
    """
    if processes == 1:
        return
    batch = config.train_batch_size
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
