"""Train on labelled auxiliary data, evaluate on a target dataset: the zero-shot protocol as a datamodule.

The training split is the union of the auxiliary datamodules' *test* splits (normal and anomalous
images with masks, e.g. every MVTec AD category); validation and test come from the target
datamodule, which contributes no training data. Images of different sizes collate because
anomalib resizes inside the datasets to the model's input size.

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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from anomalib.data import AnomalibDataModule


def _describe(datamodule: AnomalibDataModule) -> str:
    return f"{type(datamodule).__name__}(category={getattr(datamodule, 'category', None)!r})"


def _instantiate(datamodule: AnomalibDataModule | Mapping[str, Any]) -> AnomalibDataModule:
    """Accept datamodules or their ``{class_path, init_args}`` configs (as ``anomalib benchmark`` passes them)."""
    if isinstance(datamodule, Mapping):
        from anomalib.data import get_datamodule

        return get_datamodule(dict(datamodule))
    return datamodule


class AuxiliaryDataModule(AnomalibDataModule):
    """Auxiliary labelled training data plus a target datamodule for validation and test.

    Args:
        auxiliary: Datamodules (or their ``class_path``/``init_args`` configs) whose test splits, with
            masks, are the training data.
        target: Datamodule (or config) to validate and test on; its train split is not used.
        train_batch_size: Training batch size (8 in the releases).
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.
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

    def prepare_data(self) -> None:
        """Prepare every wrapped datamodule (anomalib downloads public datasets here when online)."""
        for datamodule in [*self.auxiliary, self.target]:
            datamodule.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        labelled = []
        for datamodule in self.auxiliary:
            datamodule.setup()
            samples = datamodule.test_data.samples
            anomalous = samples[samples.label_index == 1]
            if anomalous.empty:
                msg = f"Auxiliary {_describe(datamodule)} has no anomalous test samples to learn abnormality from."
                raise ValueError(msg)
            if "mask_path" not in samples or (anomalous.mask_path.fillna("") == "").any():
                msg = (
                    f"Auxiliary {_describe(datamodule)} has anomalous images without pixel masks. AnomalyCLIP and "
                    "FAPrompt learn from masks (segmentation losses); image-level-only training is not supported. "
                    "Use an auxiliary dataset with ground-truth masks (e.g. MVTec AD, VisA)."
                )
                raise ValueError(msg)
            labelled.append(datamodule.test_data)
        self.train_data = copy.deepcopy(labelled[0])
        self.train_data.samples = pd.concat([dataset.samples for dataset in labelled], ignore_index=True)

        self.target.setup()
        self.test_data = self.target.test_data
        self.val_data = getattr(self.target, "val_data", None) or self.target.test_data
