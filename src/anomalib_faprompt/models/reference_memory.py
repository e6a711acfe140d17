"""Few-shot references of a prompt method: k normal images whose patch features fill the torch model's memory.

:class:`ReferenceMemory`, a part of :class:`~anomalib_faprompt.models.base.PromptMethod`, fills the visual memory
(:class:`~anomalib_faprompt.components.VisualMemory`) with ``k_shot`` normal images at the start of validation,
test and prediction: from ``few_shot_source`` (the first ``k_shot`` images of the folder, sorted by name) when
given, otherwise sampled with ``reference_seed`` from the normal images of the datamodule's train split (the
target's, for :class:`~anomalib_faprompt.data.AuxiliaryDataModule`) by
:func:`~anomalib_faprompt.data.references.sample_normal_references`, the sampling the ``zero_shot`` pipeline gives
its baselines too. A memory that came with a checkpoint or prompt file is used only where neither is available
(predicting on a folder), and only when it holds ``k_shot`` images; ``k_shot=0`` scores without it.

Example:
    >>> from anomalib_faprompt import FAPrompt
    >>> model = FAPrompt(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10, k_shot=2)
    >>> model.k_shot, model.reference_files
    (2, [])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing import PreProcessor

from anomalib_faprompt.clip.settings import check_int
from anomalib_faprompt.compat import attached_trainer
from anomalib_faprompt.data.references import sample_normal_references

if TYPE_CHECKING:
    from anomalib_faprompt.clip.prompted_clip import PromptedCLIP

logger = logging.getLogger(__name__)


def check_references(
    k_shot: int, few_shot_source: str | Path | None, reference_seed: int
) -> tuple[int, Path | None, int]:
    """Check the few-shot reference settings.

    Raises:
        ValueError: For a negative or non-integer ``k_shot`` or ``reference_seed``.
        FileNotFoundError: For a ``few_shot_source`` that does not exist.
    """
    k_shot = check_int("k_shot", k_shot, 0, why="normal reference images; 0 is zero-shot")
    reference_seed = check_int("reference_seed", reference_seed, 0, why="of the sampling of the references")
    source = Path(few_shot_source) if few_shot_source not in {None, ""} else None
    if source is not None and not source.exists():
        msg = f"few_shot_source '{source}' does not exist (a normal reference image, or a folder of them)."
        raise FileNotFoundError(msg)
    return k_shot, source, reference_seed


class ReferenceMemory:
    """The few-shot references of a prompt method (see the module docstring)."""

    model: PromptedCLIP
    method_name: str
    pre_processor: Any
    device: torch.device
    k_shot: int
    few_shot_source: Path | None
    reference_seed: int
    #: The image files of the references in the visual memory, once collected (in sampling order).
    reference_files: list[str]

    def references_before_scoring(self) -> None:
        """Collect the references at the start of validate, test and predict (``k_shot=0``: none, memory dropped).

        Not in ``setup``: Lightning restores a ``ckpt_path`` after ``setup`` and before these hooks, and a
        checkpoint's memory is what scores where no train split or source is available (a folder to predict).
        """
        if self.k_shot:
            self.collect_references()
        elif not self.model.references.is_empty:
            logger.info(
                "%s: k_shot=0, so the visual memory of %d reference image(s) that came with the checkpoint or prompt "
                "file is not used (zero-shot scoring).",
                self.method_name,
                self.model.reference_count,
            )
            self.model.references.reset()

    def collect_references(self) -> torch.Tensor | None:
        """Fill the visual memory with ``k_shot`` normal images, pre-processed as test images; returns them.

        Returns:
            The pre-processed references (k, 3, H, W), or ``None`` when the stored memory was kept.

        Raises:
            ValueError: If fewer than ``k_shot`` normal images are available, naming where they were looked for, or
                if only a stored memory of another size is (naming both numbers).
        """
        images, source = self._reference_images()
        if images is None:
            self._check_stored_memory()
            return None
        if len(images) < self.k_shot:
            msg = (
                f"{self.method_name}: k_shot={self.k_shot} but {source} holds only {len(images)} normal image(s). "
                f"Lower k_shot to at most {len(images)} or add normal images."
            )
            raise ValueError(msg)
        images = images[: self.k_shot]
        files = [str(item.image_path) for item in images]
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        batch = torch.stack([transform(item.image) if transform is not None else item.image for item in images])
        if files == self.reference_files and not self.model.references.is_empty:
            return batch  # already in the memory: Engine.test validates, then tests, each stage starting
        self.model.references.reset()
        self.model.add_references(batch.to(self.device))
        self.reference_files = files
        size = self.model.references.nbytes / 2**20
        logger.info("%s: %d normal reference image(s) from %s in the visual memory (%.1f MB)", self.method_name,
                    self.k_shot, source, size)  # fmt: skip
        return batch

    def _check_stored_memory(self) -> None:
        """Refuse to score without references to sample, unless a stored memory of ``k_shot`` images is there."""
        if self.model.references.is_empty:
            msg = (
                f"{self.method_name}: k_shot={self.k_shot} needs normal reference images, but there is no train "
                "split to sample them from and no stored memory. Pass few_shot_source=/folder/of/normal/images "
                "(CLI: --model.few_shot_source), or use a datamodule with a train split."
            )
            raise ValueError(msg)
        stored = self.model.reference_count
        if stored != self.k_shot:
            msg = (
                f"{self.method_name}: k_shot={self.k_shot} was asked, but the visual memory that came with the "
                f"checkpoint or prompt file holds {stored} reference image(s), and there is no train split to "
                f"sample {self.k_shot} from. Use k_shot={stored} (the stored memory), or pass the normal images with "
                "few_shot_source=/folder/of/normal/images (CLI: --model.few_shot_source) or a datamodule with a train "
                f"split to build a memory of {self.k_shot}."
            )
            raise ValueError(msg)

    def _reference_images(self) -> tuple[list[Any] | None, str]:
        """Candidate normal images (dataset items, un-pre-processed, in sampling order) and where they come from."""
        if self.few_shot_source is not None:
            from anomalib.data import PredictDataset

            dataset = PredictDataset(self.few_shot_source)
            return [dataset[index] for index in range(len(dataset))], f"few_shot_source '{self.few_shot_source}'"
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        datamodule = getattr(datamodule, "target", datamodule)  # AuxiliaryDataModule: the target's normal images
        dataset = getattr(datamodule, "train_data", None)
        samples = getattr(dataset, "samples", None)
        if samples is None:
            return None, ""
        order = sample_normal_references(samples, self.k_shot, self.reference_seed)
        name = f"the train split of {getattr(datamodule, 'name', type(datamodule).__name__)}"
        category = getattr(datamodule, "category", None)
        return [dataset[index] for index in order], name + (f"/{category}" if category else "")
