"""Runs over several processes (``strategy="ddp"``, ``devices=N``, ``num_nodes=M``) that equal a one-process run.

Lightning shards a distributed run's data with a ``DistributedSampler``, and two of its choices would make the
prompt models' results depend on the number of processes. :class:`DistributedSampling`, which the prompt models
attach to every trainer, replaces them:

- **Evaluation, each image once.** For validation and test Lightning's sampler pads the shards to equal sizes by
  repeating images, which changes AUROC, AP, AUPRO, and the post-processor's thresholds and normalisation. Here
  each image is scored by exactly one process (Lightning's :class:`UnrepeatedDistributedSampler`, which it uses
  itself for prediction); shards then differ by at most one image, and anomalib's metrics gather their states
  from all processes, whatever their sizes. Every process needs at least one image of each evaluation split.
- **Training, the same global batches.** Under DDP, global batch ``i`` of an epoch is images ``i·B`` to
  ``(i+1)·B − 1`` of a permutation seeded by ``seed + epoch`` (``B``: the per-process batch times the number of
  processes, ``seed``: ``seed_everything``'s). A single process draws the same permutation, through the same
  sampler with one replica, instead of a ``RandomSampler``: with ``train_batch_size`` ``B`` in one process and
  ``B / N`` in each of ``N``, every step sees the same images, and since the losses average over the images of a
  batch and DDP averages gradients over processes, the prompts learned agree within float rounding. Exactly so
  when the number of training images is a multiple of ``N``; otherwise ``DistributedSampler`` repeats a few
  images to even the shards (warned). Loaders that do not shuffle keep their order; samplers of other kinds
  are left to Lightning.

:class:`SharedWorkspace` keeps every process's files in rank 0's folder: anomalib's ``Engine`` gives each process
that fits its own version folder and points ``latest`` at the last one made.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(accelerator="cpu", callbacks=[DistributedSampling()], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler, UnrepeatedDistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from anomalib_faprompt.compat import (
    DataLoaderSource,
    loop_data_source,
    set_default_root_dir,
    set_loop_data_source,
    update_dataloader,
)

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

logger = logging.getLogger(__name__)

__all__ = ["DistributedSampling", "SharedWorkspace", "launched_as_rank_zero", "training_seed"]

#: Environment variables in which launchers give a process its rank or its node's: Lightning's own (``LOCAL_RANK``
#: for the processes it starts, ``NODE_RANK`` set by the user on each node), torchrun's, SLURM's and LSF's.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launched_as_rank_zero() -> bool:
    """Whether this process is rank 0 of its run, as its environment says before any trainer exists.

    Code that runs around several trainers (a pipeline) uses it to write its files once: under
    ``strategy="ddp"`` Lightning starts the other processes by running the same command again, with ``LOCAL_RANK``
    set. Only meaningful in a run that is distributed (a leftover ``NODE_RANK`` makes it false anyway).
    """
    return all(os.environ.get(name, "0").strip() in {"", "0"} for name in RANK_VARIABLES)


def training_seed() -> int:
    """The seed of the training permutations: ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0, as Lightning's."""
    return int(os.getenv("PL_GLOBAL_SEED", "0"))


def _shards(trainer: Trainer) -> tuple[int, int]:
    """``(num_replicas, rank)`` of the trainer's strategy; ``(1, 0)`` for a single process."""
    kwargs = trainer.distributed_sampler_kwargs or {}
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


def _training_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """``loader`` drawing the epoch-seeded permutation of :mod:`this module <anomalib_faprompt.distributed>`."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) or type(sampler) not in {RandomSampler, SequentialSampler}:
        return loader
    dataset_size = len(loader.dataset)
    if num_replicas > 1 and dataset_size % num_replicas and rank == 0:
        logger.warning(
            "%d training images over %d processes: the sampler repeats %d image(s) to even the shards, so the prompts "
            "differ slightly from one process's with the same global batch.",
            dataset_size,
            num_replicas,
            num_replicas - dataset_size % num_replicas,
        )
    shuffle = isinstance(sampler, RandomSampler)
    permutation = DistributedSampler(
        loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=training_seed()
    )
    return update_dataloader(loader, permutation)


def _evaluation_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """``loader`` over this process's shard, each image in exactly one shard (a single process: unchanged)."""
    if num_replicas == 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    if len(loader.dataset) < num_replicas:
        msg = (
            f"An evaluation split of {len(loader.dataset)} image(s) cannot be shared by {num_replicas} processes (each "
            "needs one). Evaluate with fewer processes (--trainer.devices / --trainer.num_nodes) or more images."
        )
        raise ValueError(msg)
    shard = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=num_replicas, rank=rank, shuffle=False)
    return update_dataloader(loader, shard)


@dataclass
class _ShardedSource(DataLoaderSource):
    """A loop's source of dataloaders, whose loaders are given the samplers of :class:`DistributedSampling`."""

    trainer: Any = None
    original: DataLoaderSource | None = None

    def dataloader(self) -> Any:
        """The source's loaders, resampled while the trainer has a :class:`DistributedSampling` callback."""
        loaders = super().dataloader()
        if not any(isinstance(callback, DistributedSampling) for callback in self.trainer.callbacks):
            return loaders
        num_replicas, rank = _shards(self.trainer)
        resample = _training_loader if self.name == "train_dataloader" else _evaluation_loader
        return apply_to_collection(loaders, DataLoader, resample, num_replicas, rank)


def _loops(trainer: Trainer) -> list[Any]:
    """The loops whose data :class:`DistributedSampling` resamples (prediction is unrepeated by Lightning)."""
    return [trainer.fit_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop]


class DistributedSampling(Callback):
    """Samplers that make a distributed run give a one-process run's results (see the module docstring).

    The trainer's loops get their loaders through a source that resamples them (Lightning leaves a loader that
    already has a ``DistributedSampler`` alone): for training the epoch-seeded permutation, in one process too;
    for validation and test, under a distributed run, shards in which each image appears once.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Route the trainer's loops through the resampling source (once, however many such callbacks)."""
        del pl_module, stage
        for loop in _loops(trainer):
            source = loop_data_source(loop)
            if not isinstance(source, _ShardedSource):
                set_loop_data_source(
                    loop, _ShardedSource(source.instance, source.name, trainer=trainer, original=source)
                )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse validation shards that repeat images (loaders this callback could not resample)."""
        del pl_module
        _check_unrepeated(trainer.val_dataloaders, "validation")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse test shards that repeat images (loaders this callback could not resample)."""
        del pl_module
        _check_unrepeated(trainer.test_dataloaders, "test")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the loops their own sources back, with the data attached to them now."""
        del pl_module, stage
        for loop in _loops(trainer):
            source = loop_data_source(loop)
            if isinstance(source, _ShardedSource) and source.original is not None:
                source.original.instance = source.instance
                set_loop_data_source(loop, source.original)


def _check_unrepeated(loaders: Any, split: str) -> None:
    """Raise if a loader's distributed sampler pads its shards by repeating images (e.g. one in a CombinedLoader)."""

    def check(loader: DataLoader) -> None:
        sampler = loader.sampler
        if not isinstance(sampler, DistributedSampler) or isinstance(sampler, UnrepeatedDistributedSampler):
            return
        repeated = sampler.total_size - len(sampler.dataset)
        if repeated > 0 and not sampler.drop_last:
            msg = (
                f"The {split} loader's {type(sampler).__name__} pads the {sampler.num_replicas} processes' shards with "
                f"{repeated} repeated image(s), which would change the metrics and thresholds. Give it plain "
                "DataLoaders (a datamodule's, or a list of them) so that each image is scored once, or evaluate in "
                "one process (--trainer.devices 1)."
            )
            raise RuntimeError(msg)

    apply_to_collection(loaders, DataLoader, check)


class SharedWorkspace(Callback):
    """Every process of a distributed run writes into rank 0's ``default_root_dir`` (heat-maps, for one).

    anomalib's ``Engine`` makes a new version folder (``v<N>``, and points ``latest`` at it) in each process that
    fits, so the other processes would write their part of the heat-maps beside rank 0's, and ``latest`` would
    name the folder of the last process to start, without the checkpoint. The other processes take rank 0's
    folder and give theirs back: removed while still empty, with ``latest`` pointing at rank 0's again.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Adopt rank 0's folder (a collective call: every process runs it)."""
        del pl_module, stage
        if trainer.world_size < 2:
            return
        own = Path(trainer.default_root_dir).absolute()
        shared = Path(trainer.strategy.broadcast(str(own), src=0))
        if shared == own:
            return
        set_default_root_dir(trainer, str(shared))
        _give_back_version_folder(own, shared)


def _give_back_version_folder(own: Path, shared: Path) -> None:
    """Remove ``own`` if it is an empty version folder beside ``shared``; point ``latest`` at ``shared`` again."""
    if own.parent != shared.parent or not re.fullmatch(r"v\d+", own.name) or not shared.is_dir():
        return
    if own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    latest = own.parent / "latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == own.name:
        temporary = latest.with_name(f"latest.tmp-{os.getpid()}")
        temporary.symlink_to(shared, target_is_directory=True)
        os.replace(temporary, latest)  # atomic: other processes may be doing the same
