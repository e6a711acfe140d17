"""The few-shot protocol of ``anomalib zero_shot``: k normal reference images per category, several samplings.

A config may add::

    k_shot: [0, 1, 2, 4]      # reference images per category; 0 is the zero-shot protocol (the default: [0])
    samplings: 5              # draws of the references for each k > 0 (default 1)

The table then has one row per model, category and k, with the mean and standard deviation over the samplings
for k > 0 (:mod:`~anomalib_faprompt.pipelines.few_shot_table`). Sampling ``s`` (0, 1, …) draws its references
with the reference seed ``seed + s`` (``seed`` is the config's) by
:func:`~anomalib_faprompt.data.sample_normal_references` from the normal images of the category's train split,
the sampling the prompt models use themselves: at one (category, k, sampling) every model gets the *same*
image files. How a model gets them depends on what it is, never on its class name (:func:`reference_use`):

- a model that samples references itself (constructor args ``k_shot`` and ``reference_seed``: AnomalyCLIP,
  FAPrompt) is built with ``k_shot=k, reference_seed=seed + s`` and its learned prompts; prompts learned on
  auxiliary data are learned once, never per k;
- any other model with a ``k_shot`` argument (anomalib's ``WinClip``) is built with ``k_shot=k`` and sees a
  train split holding only the k images (WinClip takes its references from the train loader; its
  ``few_shot_source`` path reads ``pre_processor.test_transform``, which anomalib 2.7's ``PreProcessor`` lacks);
- a model that learns from normal images (anomalib's one-class models such as ``Patchcore``, and methods
  listing ``Learning.FEW_SHOT_PROMPTS`` in :data:`~anomalib_faprompt.methods.METHODS`, such as PromptAD) is
  fitted on a train split holding only the k images. At k = 0 one-class models keep the whole train split
  (the zero-shot protocol's baseline); methods that need references get no k = 0 row.

A model that can take no references (no ``k_shot`` argument, learns nothing from normal images) is refused
when k > 0, as is ``k_shot`` above the normal images of any target category, before any work is done.

Example:
    >>> plan_shots({"seed": 0, "k_shot": [0, 2], "samplings": 2})
    [Shot(k=0, sampling=0, seed=None), Shot(k=2, sampling=0, seed=0), Shot(k=2, sampling=1, seed=1)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset

from anomalib_faprompt.data import sample_normal_references

#: The protocol settings of this module (top-level keys of a ``zero_shot`` config).
FEW_SHOT_KEYS = frozenset({"k_shot", "samplings"})

#: Model init args the protocol sets per k and sampling; refused in a model's ``init_args`` when k > 0.
REFERENCE_ARGS = ("k_shot", "reference_seed", "few_shot_source")


@dataclasses.dataclass(frozen=True)
class Shot:
    """One k and sampling of the protocol.

    Attributes:
        k: Normal reference images per category (0: zero-shot).
        sampling: Index of the draw (0 at k = 0).
        seed: Reference seed of the draw (config seed + sampling), ``None`` at k = 0.
    """

    k: int
    sampling: int
    seed: int | None

    def row_settings(self, files: Sequence[str]) -> dict[str, Any]:
        """What a row's fingerprint adds for this shot: nothing at k = 0 (today's rows), else k, seed and files."""
        if not self.k:
            return {}
        return {"references": {"k_shot": self.k, "sampling": self.sampling, "seed": self.seed, "files": list(files)}}

    @property
    def suffix(self) -> str:
        """Row-file name part: empty at k = 0 (today's names), else ``-k<k>-s<sampling>``."""
        return f"-k{self.k}-s{self.sampling}" if self.k else ""


def _count(config: dict[str, Any], key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{key} must be an integer of at least {minimum}, got {value!r} (in {config.get(key)!r})."
        raise ValueError(msg)
    return value


def plan_shots(config: dict[str, Any]) -> list[Shot]:
    """The shots of a config's ``k_shot`` and ``samplings``, k ascending; ``[Shot(0, 0, None)]`` without them.

    Raises:
        ValueError: For a ``k_shot`` that is not a non-negative integer or a list of distinct ones, or
            ``samplings`` below 1.
    """
    given = config.get("k_shot", [0])
    ks = [given] if not isinstance(given, list) else given
    ks = [_count(config, "k_shot", k, 0) for k in ks]
    if not ks or len(set(ks)) != len(ks):
        msg = f"k_shot must be a non-empty list of distinct integers >= 0 (e.g. [0, 1, 2, 4]), got {given!r}."
        raise ValueError(msg)
    samplings = _count(config, "samplings", config.get("samplings", 1), 1)
    seed = config.get("seed", 0)
    return [Shot(k, s, seed + s) if k else Shot(0, 0, None) for k in sorted(ks) for s in range(samplings if k else 1)]


def plan_references(targets: Iterable[Any], shots: Sequence[Shot]) -> dict[tuple[str, str, Shot], tuple[str, ...]]:
    """The reference image files of every (dataset, category, shot) with k > 0, drawn before any work.

    Args:
        targets: The config's target :class:`~anomalib_faprompt.pipelines.datasets.DatasetSpec` s.
        shots: :func:`plan_shots`.

    Returns:
        ``{(dataset name, category, shot): files}``, the files in sampling order.

    Raises:
        ValueError: If a category's train split holds fewer normal images than the largest ``k_shot``, naming
            the setting, the dataset, the category and the count.
    """
    largest = max(shot.k for shot in shots)
    references: dict[tuple[str, str, Shot], tuple[str, ...]] = {}
    if not largest:
        return references
    for target in targets:
        for category in target.categories:
            datamodule = target.datamodule(category)
            datamodule.setup()  # the splits the trainer will make: the datamodules split with their own seed
            samples = datamodule.train_data.samples
            normal = int((samples["label_index"] == 0).sum())
            if normal < largest:
                msg = (
                    f"k_shot: {largest} needs {largest} normal reference images per category, but the train split "
                    f"of {target.name}/{category} holds {normal}. Lower k_shot's largest value to at most {normal}, "
                    f"or leave {target.name}/{category} out of targets."
                )
                raise ValueError(msg)
            for shot in shots:
                if shot.k:
                    positions = sample_normal_references(samples, shot.k, shot.seed)
                    references[target.name, category, shot] = tuple(str(samples.image_path.iloc[i]) for i in positions)
    return references


@dataclasses.dataclass(frozen=True)
class ReferenceUse:
    """How one model gets a shot's references.

    Attributes:
        init_args: Constructor args to add (``k_shot``, ``reference_seed``).
        restrict_train_split: Whether its datamodule's train split holds only the references.
    """

    init_args: dict[str, Any]
    restrict_train_split: bool


def reference_use(parameters: Collection[str], learns_from_normals: bool, shot: Shot) -> ReferenceUse:
    """How a model with these constructor ``parameters`` gets the references of ``shot`` (module docstring).

    Example:
        >>> reference_use({"k_shot", "reference_seed"}, False, Shot(2, 1, 1))
        ReferenceUse(init_args={'k_shot': 2, 'reference_seed': 1}, restrict_train_split=False)
        >>> reference_use({"backbone", "layers"}, True, Shot(2, 1, 1))  # e.g. Patchcore
        ReferenceUse(init_args={}, restrict_train_split=True)
    """
    if not shot.k:
        return ReferenceUse({}, restrict_train_split=False)
    init_args: dict[str, Any] = {"k_shot": shot.k} if "k_shot" in parameters else {}
    if "reference_seed" in parameters:
        init_args["reference_seed"] = shot.seed
    return ReferenceUse(init_args, restrict_train_split=learns_from_normals or "reference_seed" not in parameters)


def check_takes_references(
    index: int, label: str, parameters: Collection[str], learns_from_normals: bool, given: Collection[str]
) -> None:
    """Refuse, before any work, a model that cannot take references or whose config sets them itself.

    Raises:
        ValueError: Naming the model's entry and what to change.
    """
    if "k_shot" not in parameters and not learns_from_normals:
        msg = (
            f"models[{index}] ({label}) cannot use reference images (no k_shot argument, and it learns nothing from "
            f"normal images), so it has no k > 0 rows. Remove it, or run the config with k_shot: [0]."
        )
        raise ValueError(msg)
    if set_here := [name for name in REFERENCE_ARGS if name in given]:
        msg = (
            f"models[{index}].init_args sets {set_here}, which the few-shot protocol sets per k and sampling from the "
            f"config's k_shot, samplings and seed; remove them from the model."
        )
        raise ValueError(msg)


def _only_files(dataset: AnomalibDataset, files: Sequence[str]) -> AnomalibDataset:
    positions = {str(path): index for index, path in enumerate(dataset.samples.image_path)}
    if missing := [path for path in files if path not in positions]:
        msg = f"Reference images {missing} are not in the train split any more; was the dataset changed?"
        raise RuntimeError(msg)
    return dataset.subsample([positions[path] for path in files])


def restrict_train_split(datamodule: AnomalibDataModule, files: Sequence[str]) -> None:
    """Make ``datamodule``'s train split hold only ``files`` whenever the trainer sets it up.

    The datamodule's own ``setup`` makes its splits as usual (test and validation splits unchanged); the train
    split is then cut to the references, so fitting (PatchCore) and WinClip's reference loader see only them.

    Example:
        >>> restrict_train_split(datamodule, ["datasets/x/train/good/003.png"])  # doctest: +SKIP
    """
    setup = datamodule.setup

    def setup_with_references(stage: str | None = None) -> None:
        setup(stage)
        datamodule.train_data = _only_files(datamodule.train_data, files)

    datamodule.setup = setup_with_references  # Lightning calls the datamodule's hooks by attribute


def used_references(model: Any, datamodule: AnomalibDataModule, use: ReferenceUse) -> list[str] | None:
    """The image files a tested model took its references from: its ``reference_files``, or the cut train split."""
    if use.restrict_train_split:
        return [str(path) for path in datamodule.train_data.samples.image_path]
    return getattr(model, "reference_files", None)
