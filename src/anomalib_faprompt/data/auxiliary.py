"""Train on labelled auxiliary data, evaluate on a target dataset: the zero-shot protocol as a datamodule.

The training split is the union of the auxiliary datamodules' labelled images (their *test* images,
normal and anomalous with masks, e.g. every MVTec AD category); validation and test are the target
datamodule's own splits, and the target contributes no training data. Images of different sizes
collate because anomalib resizes inside the datasets to the model's input size. Every file is checked
first (:mod:`anomalib_faprompt.data.validation`).

Example:
    >>> import tempfile
    >>> from anomalib.data import MVTecAD
    >>> from anomalib_faprompt.data import AuxiliaryDataModule, generate_synthetic_dataset
    >>> root = generate_synthetic_dataset(tempfile.mkdtemp(), categories=["stripes", "disc"], n_train=2, n_test=2)
    >>> datamodule = AuxiliaryDataModule(
    ...     auxiliary=[MVTecAD(root=root, category="stripes", num_workers=0)],
    ...     target=MVTecAD(root=root, category="disc", num_workers=0),
    ...     num_workers=0,
    ... )
    >>> datamodule.setup()
    >>> len(datamodule.train_data), int(datamodule.train_data.samples.label_index.sum())
    (4, 2)
    >>> datamodule.auxiliary_counts[["category", "normal", "anomalous"]].values.tolist()  # images per category
    [['stripes', 2, 2]]
    >>> len(datamodule.test_data), int(datamodule.test_data.samples.label_index.sum())  # the target's test split
    (4, 2)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
from anomalib.data import AnomalibDataModule

from anomalib_faprompt.compat import read_splits

from .validation import find_unmasked_images, refusal, validate_samples

if TYPE_CHECKING:
    from anomalib.data.datasets.base.image import AnomalibDataset

logger = logging.getLogger(__name__)


def _describe(datamodule: AnomalibDataModule) -> str:
    category = getattr(datamodule, "category", None)
    if category:
        return f"{type(datamodule).__name__}(category={category!r})"
    return f"{type(datamodule).__name__}(name={getattr(datamodule, 'name', None)!r})"


def _instantiate(datamodule: AnomalibDataModule | Mapping[str, Any]) -> AnomalibDataModule:
    """Accept datamodules or their ``{class_path, init_args}`` configs (as ``anomalib benchmark`` passes them)."""
    if isinstance(datamodule, Mapping):
        from anomalib.data import get_datamodule

        return get_datamodule(dict(datamodule))
    return datamodule


def _count(samples: pd.DataFrame) -> tuple[int, int]:
    labels = samples.label_index
    return int((labels == 0).sum()), int((labels == 1).sum())


def _set_up(datamodule: AnomalibDataModule, role: str, setup: Any) -> None:
    """Run ``setup`` (the datamodule's, or its dataset reading); name unmasked images if anomalib fails on them."""
    try:
        setup()
    except Exception as error:
        problems = find_unmasked_images(datamodule)
        if not problems:
            raise
        raise refusal(problems, f"{role} {_describe(datamodule)}") from error


def _labelled_images(datamodule: AnomalibDataModule) -> AnomalibDataset:
    """The labelled images a datamodule's dataset reads from disk, before anomalib's split modes.

    The datamodule is read through a shallow copy, so a datamodule the caller set up keeps its splits.
    """
    reader = copy.copy(datamodule)
    for subset in ("train_data", "val_data", "test_data"):
        reader.__dict__.pop(subset, None)
    # anomalib's hook that reads the splits from disk; setup() would then apply the split modes.
    _set_up(datamodule, "auxiliary", lambda: read_splits(reader))
    datasets = [reader.test_data]
    if "val_data" in reader.__dict__:  # a validation directory of its own (val_split_mode=from_dir)
        datasets.append(reader.val_data)
    samples = pd.concat([dataset.samples for dataset in datasets], ignore_index=True)
    samples = samples[samples.label_index.isin([0, 1])].drop_duplicates("image_path", ignore_index=True)
    samples.attrs["task"] = "segmentation"
    labelled = copy.deepcopy(reader.test_data)
    labelled.samples = samples
    return labelled


class AuxiliaryDataModule(AnomalibDataModule):
    """Auxiliary labelled training data plus a target datamodule for validation and test.

    **Auxiliary (training) images.** Every labelled image of each auxiliary datamodule is used: the
    images of the test split its dataset reads from disk, plus those of a validation directory of its
    own (``val_split_mode="from_dir"``, e.g. MVTec LOCO, BMAD), counted once each. For MVTec AD layouts
    these are every image under ``test/`` (``good`` and each defect, masks from ``ground_truth/``); for
    ``Folder``, ``normal_test_dir`` and ``abnormal_dir`` (masks from ``mask_dir``; ``normal_dir`` is
    training data and is not used). The auxiliary datamodule's split modes, meant for anomalib's
    one-class training, are not applied, so its defaults cannot drop images silently:

    - ``val_split_mode``: ``from_test`` (``Folder``'s default) would move part of the test images to
      validation; ``same_as_test`` (``MVTecAD``'s default) would copy them; ``synthetic`` and
      ``from_train`` take training images. All four leave the labelled set above unchanged.
    - ``test_split_mode``: ``none`` would drop the normal test images, ``synthetic`` would replace the
      anomalous ones with generated anomalies; ``from_dir`` (the default) keeps them. None is applied.

    Images with unknown labels are not used, and every anomalous image needs a mask. The numbers of
    normal and anomalous images used per auxiliary datamodule are logged and kept in
    :attr:`auxiliary_counts`. The auxiliary datamodules themselves are not modified (nor set up).

    **Target.** The target datamodule is set up as anomalib defines it, with its own split modes, and
    its test and validation splits are used unchanged (validation falls back to the test split when the
    target has none). This datamodule applies no split of its own on top.

    All images and masks are checked before use (see :func:`~anomalib_faprompt.data.validate_samples`).

    Args:
        auxiliary: Datamodules (or their ``class_path``/``init_args`` configs) whose labelled images, with
            masks, are the training data.
        target: Datamodule (or config) to validate and test on; its train split is not used.
        train_batch_size: Training batch size (8 in the releases).
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.

    Raises:
        ValueError: When an auxiliary datamodule has no anomalous images, or none with masks.
        DataValidationError: Naming each file anomalib would read wrongly or fail on.
    """

    def __init__(
        self,
        auxiliary: Sequence[AnomalibDataModule | Mapping[str, Any]],
        target: AnomalibDataModule | Mapping[str, Any],
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 4,
    ) -> None:
        super().__init__(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if not auxiliary:
            msg = "AuxiliaryDataModule needs at least one auxiliary datamodule to learn prompts from."
            raise ValueError(msg)
        self.auxiliary = [_instantiate(datamodule) for datamodule in auxiliary]
        self.target = _instantiate(target)
        self._auxiliary_counts: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        """Name used for result folders: the target's."""
        return self.target.name

    @property
    def category(self) -> str:
        """Category of the target."""
        return self.target.category

    @category.setter
    def category(self, category: str) -> None:
        self.target.category = category

    @property
    def auxiliary_counts(self) -> pd.DataFrame:
        """Images used for prompt learning: one row per auxiliary datamodule.

        Columns ``datamodule`` (class and category, or name for ``Folder``), ``category``, ``normal`` and
        ``anomalous`` (image counts).

        Raises:
            RuntimeError: Before :meth:`setup`.
        """
        if self._auxiliary_counts is None:
            msg = "AuxiliaryDataModule.auxiliary_counts is known after setup(); call setup() first."
            raise RuntimeError(msg)
        return self._auxiliary_counts

    def prepare_data(self) -> None:
        """Prepare every wrapped datamodule (anomalib downloads public datasets here when online)."""
        for datamodule in [*self.auxiliary, self.target]:
            datamodule.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        labelled, counts = [], []
        for datamodule in self.auxiliary:
            dataset = _labelled_images(datamodule)
            samples = dataset.samples
            anomalous = samples[samples.label_index == 1]
            if anomalous.empty:
                msg = f"Auxiliary {_describe(datamodule)} has no anomalous test samples to learn abnormality from."
                raise ValueError(msg)
            if "mask_path" not in samples or (anomalous.mask_path.fillna("") == "").all():
                msg = (
                    f"Auxiliary {_describe(datamodule)} has anomalous images without pixel masks. AnomalyCLIP and "
                    "FAPrompt learn from masks (segmentation losses); image-level-only training is not supported. "
                    "Use an auxiliary dataset with ground-truth masks (e.g. MVTec AD, VisA)."
                )
                raise ValueError(msg)
            validate_samples(samples, f"auxiliary {_describe(datamodule)}")
            normal, abnormal = _count(samples)
            logger.info(
                "Auxiliary %s: %d normal and %d anomalous images for prompt learning",
                _describe(datamodule),
                normal,
                abnormal,
            )
            if normal == 0:
                logger.warning(
                    "Auxiliary %s has no normal test images: prompts learn normality from anomalous images' "
                    "backgrounds only (for Folder, set normal_test_dir).",
                    _describe(datamodule),
                )
            counts.append((_describe(datamodule), getattr(datamodule, "category", None), normal, abnormal))
            labelled.append(dataset)
        self.train_data = copy.deepcopy(labelled[0])
        train_samples = pd.concat([dataset.samples for dataset in labelled], ignore_index=True)
        train_samples.attrs["task"] = "segmentation"
        self.train_data.samples = train_samples
        self._auxiliary_counts = pd.DataFrame(counts, columns=["datamodule", "category", "normal", "anomalous"])

        _set_up(self.target, "target", self.target.setup)
        self.test_data = self.target.test_data
        target_val = getattr(self.target, "val_data", None)
        self.val_data = target_val if target_val is not None and len(target_val) > 0 else self.test_data
        for split, dataset in (("test", self.test_data), ("validation", self.val_data)):
            validate_samples(dataset.samples, f"target {_describe(self.target)} {split} split")
            logger.info(
                "Target %s %s split: %d normal and %d anomalous images",
                _describe(self.target),
                split,
                *_count(dataset.samples),
            )

    def _create_test_split(self) -> None:
        """Keep the target's test split as its datamodule made it (anomalib's would drop its normal images)."""

    def _create_val_split(self) -> None:
        """Keep the target's validation split as its datamodule made it."""
