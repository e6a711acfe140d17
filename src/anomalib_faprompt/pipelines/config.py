"""The ``zero_shot`` config: a typed object, refused with one message naming the key before any work.

:func:`load_config` reads a YAML file (or takes a mapping), has jsonargparse parse it into :class:`ZeroShotConfig`
(unknown keys and wrong types are refused by the parser, naming the key) and then checks what the parser cannot
know: that each model and datamodule class exists and takes the arguments given (a misspelt name is answered with the
close match and the known names), that category lists are not empty or repeated, and that ``results_dir`` is not a
file. Without these checks the mistakes ended deep inside anomalib (an ``UnknownModelError`` listing mangled names,
a ``TypeError``), in an ``IndexError`` after the results folder was locked, or in an ``OSError``.

Example:
    >>> load_config({"models": [{"class_path": "FAPromt"}], "targets": [{"dataset": {"class_path": "MVTecAD"}}],
    ...              "auxiliary": {"dataset": {"class_path": "MVTecAD"}}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: models[0].class_path 'FAPromt' is not an anomalib model; did you mean 'FAPrompt'? ...
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from anomalib_faprompt.signatures import constructor_parameters, takes_any_keyword


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A dataset of the protocol: ``{dataset: {class_path, init_args}, categories: [...] | all}``."""

    #: The datamodule: ``class_path`` (a name on ``anomalib.data`` or a dotted path) and ``init_args``.
    dataset: dict[str, Any]
    #: Its categories, or ``all`` (anomalib's list for the datamodule, else the folders under its root).
    categories: list[str] | Literal["all"] = "all"


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """The settings of ``anomalib zero_shot`` (see :mod:`~anomalib_faprompt.pipelines.zero_shot`)."""

    #: Where the prompts are learned (labelled images with masks).
    auxiliary: DatasetEntry
    #: The datasets the models are tested on.
    targets: list[DatasetEntry]
    #: The models: ``{class_path, init_args}`` each (a name on ``anomalib.models`` or a dotted path).
    models: list[dict[str, Any]]
    seed: int = 0
    accelerator: str = "auto"
    #: Processes per machine (DDP above 1).
    devices: int = 1
    #: Machines.
    num_nodes: int = 1
    strategy: str = "auto"
    #: Epochs of prompt learning (a model's own ``max_epochs`` wins).
    max_epochs: int = 15
    #: The global batch of prompt learning, over all processes.
    train_batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 4
    results_dir: str = "results/zero_shot"
    #: Normal reference images per category; 0 is the zero-shot protocol.
    k_shot: int | list[int] = 0
    #: Draws of the references for each k > 0.
    samplings: int = 1
    #: Run auxiliary categories that are also targets anyway, marking their rows.
    allow_overlap: bool = False

    @property
    def datamodule_defaults(self) -> dict[str, Any]:
        """Datamodule arguments shared by every dataset (batch sizes, workers)."""
        return {"train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size,
                "num_workers": self.num_workers}  # fmt: skip


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_config(source: Mapping[str, Any] | str | Path) -> ZeroShotConfig:
    """The config of a mapping or a YAML file, parsed and checked (see the module docstring).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: For any mistake, naming the key and what is allowed.
    """
    from jsonargparse import ArgumentParser

    raw = dict(source) if isinstance(source, Mapping) else read_config_file(source)
    parser = ArgumentParser(exit_on_error=False)
    # The entries stay plain mappings for the parser, which would otherwise read their ``class_path`` as a class of
    # its own to import (and fail on a short name such as ``MVTecAD``); they are checked below, naming the key.
    entries = {"auxiliary": dict[str, Any], "targets": list[dict[str, Any]], "models": list[dict[str, Any]]}
    parser.add_class_arguments(ZeroShotConfig, as_group=False, skip=set(entries))
    for name, entry_type in entries.items():
        parser.add_argument(f"--{name}", type=entry_type, required=True)
    try:
        parsed = parser.instantiate_classes(parser.parse_object(raw))
    except Exception as error:  # jsonargparse's ArgumentError
        msg = f"zero_shot config: {_one_line(error)} (the settings are {', '.join(ZeroShotConfig.__annotations__)})."
        raise ValueError(msg) from error
    settings = {field.name: parsed[field.name] for field in dataclasses.fields(ZeroShotConfig)}
    settings["auxiliary"] = dataset_entry(settings["auxiliary"], "auxiliary")
    settings["targets"] = [dataset_entry(entry, f"targets[{index}]") for index, entry in enumerate(settings["targets"])]
    for index, entry in enumerate(settings["models"]):
        _check_keys(entry, {"class_path", "init_args"}, f"models[{index}]")
    config = ZeroShotConfig(**settings)
    check_entries(config)
    return config


def _check_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        msg = f"{where}.{unknown[0]} is not a setting of {where}; it takes {', '.join(sorted(allowed))}."
        raise ValueError(msg)


def dataset_entry(entry: Mapping[str, Any], where: str) -> DatasetEntry:
    """A dataset entry of the config (``auxiliary``, ``targets[i]``), its keys checked.

    Raises:
        ValueError: For a missing ``dataset`` or a key it does not take, naming it.
    """
    _check_keys(entry, {"dataset", "categories"}, where)
    if not isinstance(entry.get("dataset"), Mapping):
        example = "{class_path: MVTecAD, init_args: {root: ./datasets/MVTecAD}}"
        msg = f"{where}.dataset is required, e.g. {example}; got {entry.get('dataset')!r}."
        raise ValueError(msg)
    return DatasetEntry(dict(entry["dataset"]), entry.get("categories", "all"))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML config file, or an error naming the file (and the line of a YAML mistake).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not valid YAML or not a mapping of settings.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        msg = f"zero_shot config '{path}' does not exist."
        raise FileNotFoundError(msg)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        msg = f"zero_shot config '{path}' is not valid YAML: {' '.join(str(error).split())}"
        raise ValueError(msg) from error
    if not isinstance(content, dict):
        msg = f"zero_shot config '{path}' must be a mapping of settings (seed, models, targets, ...), got {content!r}."
        raise ValueError(msg)
    return content


def _suggestion(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "."


def _class_names(module_name: str, base: type) -> list[str]:
    """The names of ``base``'s subclasses on a module: the short names a config's ``class_path`` may use."""
    module = importlib.import_module(module_name)
    names = [name for name in getattr(module, "__all__", dir(module)) if not name.startswith("_")]
    return sorted(
        name
        for name in names
        if isinstance(getattr(module, name, None), type) and issubclass(getattr(module, name), base)
    )


def resolve_class(
    class_path: Any, where: str, default_module: str, kind: str = "class", known: Sequence[str] = ()
) -> type:
    """The class a config's ``class_path`` names (a short name on ``default_module``, or a dotted path).

    Args:
        class_path: The config's value.
        where: Its key, for messages (``models[0].class_path``).
        default_module: The module of short names (``anomalib.models``).
        kind: What it should name, for messages (``"an anomalib model"``).
        known: The short names to suggest from.

    Raises:
        ValueError: Naming ``where``, the close match and the known names.
    """
    if not isinstance(class_path, str) or not class_path:
        msg = f"{where} must be a class name (e.g. 'FAPrompt') or a dotted class path, got {class_path!r}."
        raise ValueError(msg)
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name or default_module)
    except ImportError as error:
        msg = f"{where} '{class_path}': module '{module_name}' cannot be imported ({error})."
        raise ValueError(msg) from error
    found = getattr(module, name, None)
    if isinstance(found, type):
        return found
    names = list(known) or [key for key in dir(module) if isinstance(getattr(module, key), type)]
    msg = f"{where} '{class_path}' is not {kind}{_suggestion(name, names)} Known: {', '.join(names)}."
    raise ValueError(msg)


def check_init_args(class_type: type, init_args: Any, where: str) -> None:
    """Refuse ``init_args`` that are not a mapping or name an argument the class's constructor does not take.

    Raises:
        ValueError: Naming the key (``models[0].init_args.sigmaa``), the close match and the arguments.
    """
    if init_args is None:
        return
    if not isinstance(init_args, Mapping):
        msg = f"{where} must be a mapping of argument names to values, got {init_args!r}."
        raise ValueError(msg)
    if takes_any_keyword(class_type):
        return
    parameters = constructor_parameters(class_type)
    for key in init_args:
        if key not in parameters:
            msg = (
                f"{where}.{key} is not an argument of {class_type.__name__}{_suggestion(str(key), parameters)} "
                f"Its arguments: {', '.join(parameters)}."
            )
            raise ValueError(msg)


def _check_categories(value: Any, where: str) -> None:
    if value == "all":
        return
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        msg = f"{where} must be 'all' or a non-empty list of category names (e.g. [bottle, cable]), got {value!r}."
        raise ValueError(msg)
    repeated = sorted({item for item in value if value.count(item) > 1})
    if repeated:
        msg = f"{where} lists {repeated} more than once; list each category once."
        raise ValueError(msg)


def _check_dataset(entry: DatasetEntry, where: str) -> None:
    from anomalib.data import AnomalibDataModule

    dataset = entry.dataset
    known = _class_names("anomalib.data", AnomalibDataModule)
    kind = "an anomalib datamodule"
    class_type = resolve_class(dataset.get("class_path"), f"{where}.dataset.class_path", "anomalib.data", kind, known)
    if not issubclass(class_type, AnomalibDataModule):
        msg = f"{where}.dataset.class_path '{dataset['class_path']}' is not {kind}. Known: {', '.join(known)}."
        raise ValueError(msg)
    check_init_args(class_type, dataset.get("init_args"), f"{where}.dataset.init_args")
    _check_categories(entry.categories, f"{where}.categories")


def check_entries(config: ZeroShotConfig) -> None:
    """Check what the parser cannot know, before anything is built or written (module docstring).

    Raises:
        ValueError: For a model or datamodule class that does not exist, an argument its constructor does not take,
            an empty or repeated category list, or a ``results_dir`` that is a file; each message names the key.
    """
    results_dir = Path(config.results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        msg = f"results_dir '{results_dir}' is a file, not a folder; give a folder for the results (created if new)."
        raise ValueError(msg)
    from anomalib.models import AnomalibModule

    known = _class_names("anomalib.models", AnomalibModule)
    for index, entry in enumerate(config.models):
        where = f"models[{index}].class_path"
        class_type = resolve_class(entry.get("class_path"), where, "anomalib.models", "an anomalib model", known)
        check_init_args(class_type, entry.get("init_args"), f"models[{index}].init_args")
    _check_dataset(config.auxiliary, "auxiliary")
    for index, target in enumerate(config.targets):
        _check_dataset(target, f"targets[{index}]")
