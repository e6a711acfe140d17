"""The datasets of a ``zero_shot`` run: which datamodule, which categories, whether each target is used once.

:class:`DatasetSpec` builds an entry's datamodules and resolves its categories: ``all`` is the list anomalib
declares for the datamodule (:data:`CATEGORY_TABLES`) or the datamodule class itself
(``categories_available``, e.g. :class:`~anomalib_faprompt.data.SyntheticAD`), else the folders under its root.
A datamodule that writes its categories (``writes_categories``) writes the missing ones first. Then
:func:`check_duplicate_targets` and :func:`check_overlap` check what the entries resolve to:

- the same target category listed twice would give two identical rows, both counted in the mean: refused;
- an auxiliary category that is also a target would be tested on the prompts learned on it, and the table would
  call it zero-shot: refused, unless ``allow_overlap: true``, which marks those rows (``auxiliary_overlap``).

Example:
    >>> spec = DatasetSpec({"dataset": {"class_path": "MVTecAD", "init_args": {"root": "."}}, "categories": ["disc"]},
    ...                    {"num_workers": 0})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from anomalib.data import AnomalibDataModule

from anomalib_faprompt.signatures import constructor_parameters

from .config import resolve_class
from .result_files import canonical

#: Where anomalib declares the categories of each datamodule that has them (its datasets' ``CATEGORIES``).
CATEGORY_TABLES = {
    "MVTecAD": "anomalib.data.datasets.image.mvtecad",
    "MVTecAD2": "anomalib.data.datasets.image.mvtecad2",
    "MVTecLOCO": "anomalib.data.datasets.image.mvtec_loco",
    "Visa": "anomalib.data.datasets.image.visa",
    "MPDD": "anomalib.data.datasets.image.mpdd",
    "BTech": "anomalib.data.datasets.image.btech",
    "AutoVI": "anomalib.data.datasets.image.autovi",
    "BMAD": "anomalib.data.datasets.image.bmad",
    "Kaputt": "anomalib.data.datasets.image.kaputt",
    "RealIAD": "anomalib.data.datasets.image.realiad",
    "VAD": "anomalib.data.datasets.image.vad",
    "MVTec3D": "anomalib.data.datasets.depth.mvtec_3d",
    "ADAM3D": "anomalib.data.datasets.depth.adam_3d",
}


def declared_categories(datamodule_class: type) -> list[str]:
    """The categories a datamodule class declares itself, or anomalib declares for it (the nearest in its MRO)."""
    declared = getattr(datamodule_class, "categories_available", None)
    if declared:
        return list(declared)
    for owner in datamodule_class.__mro__:
        if owner.__name__ in CATEGORY_TABLES:
            return list(getattr(importlib.import_module(CATEGORY_TABLES[owner.__name__]), "CATEGORIES", ()))
    return []


class DatasetSpec:
    """A dataset of the protocol: datamodule class, its arguments and the categories to use.

    Its :attr:`name` is the datamodule's own (``datamodule.name``: the class name, a ``Folder``'s ``name``
    argument, ``SyntheticAD`` for generated categories): the table's dataset column and the results folder
    use it.

    Args:
        config: ``{"dataset": {"class_path": ..., "init_args": {...}}, "categories": [...] | "all"}``.
        defaults: Datamodule arguments shared by all datasets (batch sizes, workers).

    Raises:
        ValueError: For categories that the datamodule does not have.
        FileNotFoundError: For a dataset or category not on disk, naming where it was looked for.
    """

    def __init__(self, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
        dataset = config["dataset"]
        self.datamodule_class = resolve_class(dataset["class_path"], "dataset.class_path", "anomalib.data",
                                              "a datamodule")  # fmt: skip
        self.init_args = {**defaults, **(dataset.get("init_args") or {})}
        self.class_name = self.datamodule_class.__name__
        self.name = self.datamodule_class(**self.init_args).name  # datamodules touch no file when built
        self.root = Path(self.init_args.get("root", ""))
        #: What tells two entries' data apart: the datamodule class and its root folder.
        self.identity = (self.class_name, str(self.root.resolve()))
        self.has_categories = "category" in constructor_parameters(self.datamodule_class)
        if not self.has_categories:  # single-category datasets (e.g. Kolektor)
            self.categories = [self.name.lower()]
            if not self.root.is_dir():
                msg = f"{self.name}: dataset not found at '{self.root}'. Download it there or fix init_args.root."
                raise FileNotFoundError(msg)
            return
        self.categories = self._resolve_categories(config.get("categories", "all"))

    def _resolve_categories(self, categories: Sequence[str] | str) -> list[str]:
        known = declared_categories(self.datamodule_class)
        on_disk = sorted(path.name for path in self.root.iterdir() if path.is_dir()) if self.root.is_dir() else []
        categories = list(known or on_disk) if categories == "all" else list(categories)
        unknown = [category for category in categories if category not in known and category not in on_disk]
        if unknown:
            msg = f"{self.name}: unknown categories {unknown}; available: {known or on_disk}."
            raise ValueError(msg)
        if getattr(self.datamodule_class, "writes_categories", False):  # written on first use (or checked)
            for category in categories:
                self.datamodule(category).prepare_data()
        missing = [category for category in categories if not (self.root / category).is_dir()]
        if missing:
            msg = (
                f"{self.name}: categories {missing} not found under '{self.root}'. Download the dataset there "
                f"(anomalib's datamodules do this when online) or fix init_args.root in the config."
            )
            raise FileNotFoundError(msg)
        return categories

    def datamodule(self, category: str) -> AnomalibDataModule:
        """The datamodule of one category."""
        if not self.has_categories:
            return self.datamodule_class(**self.init_args)
        return self.datamodule_class(**self.init_args, category=category)

    def settings(self, ignore: Collection[str] = ("num_workers",)) -> dict[str, Any]:
        """What identifies the data, for fingerprints: datamodule class and init args but those in ``ignore``."""
        init_args = {key: value for key, value in self.init_args.items() if key not in ignore}
        return {"dataset": self.class_name, "init_args": canonical(init_args)}


def check_duplicate_targets(targets: Sequence[Any]) -> None:
    """Refuse a target category listed twice (in one entry or in two): two identical rows, both in the mean.

    Args:
        targets: The target ``DatasetSpec`` s (categories resolved, ``"all"`` expanded).

    Raises:
        ValueError: Naming the category and both entries.
    """
    seen: dict[tuple[str, str], int] = {}
    for index, target in enumerate(targets):
        for category in target.categories:
            key = (target.name, category)
            if key in seen:
                msg = (
                    f"targets[{seen[key]}] and targets[{index}] both list {target.name}/{category}: the table would "
                    "hold two identical rows, both counted in the mean. List each target category once."
                )
                raise ValueError(msg)
            seen[key] = index


def check_overlap(auxiliary: Any, targets: Sequence[Any], allow_overlap: bool) -> set[tuple[str, str]]:
    """Refuse auxiliary categories that are also targets, unless ``allow_overlap``; return them.

    Args:
        auxiliary: The auxiliary ``DatasetSpec``, or ``None`` when no model learns prompts on it.
        targets: The target ``DatasetSpec`` s (categories resolved).
        allow_overlap: The config's ``allow_overlap``.

    Returns:
        The (dataset name, category) of targets that are also auxiliary categories (only when allowed).

    Raises:
        ValueError: Naming the overlapping categories and what to change.
    """
    if auxiliary is None:
        return set()
    overlap = {
        (target.name, category)
        for target in targets
        if target.identity == auxiliary.identity
        for category in target.categories
        if category in auxiliary.categories
    }
    if overlap and not allow_overlap:
        shown = ", ".join(f"{name}/{category}" for name, category in sorted(overlap))
        msg = (
            f"{shown}: auxiliary categories that are also targets. The prompts would be learned on the images they "
            "are then tested on, and the table would call that zero-shot. Remove them from auxiliary.categories or "
            "from the targets, or set allow_overlap: true to run them anyway, marked in the table "
            "(auxiliary_overlap)."
        )
        raise ValueError(msg)
    return overlap
