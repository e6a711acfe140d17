"""Every use of a private Lightning or anomalib name, in one module, each checked against the versions tested.

The plugin needs a few things the libraries expose only privately. Each shim here says what it relies on and why
no public interface does it; :func:`require` refuses, naming the versions tested, when a name is gone, so a library
release that changes one fails loudly (and ``tests/test_compat.py``, which checks each shim's behaviour against the
installed libraries, fails first). The package's dependencies are bounded above by the versions in
:data:`TESTED_WITH`; nothing outside this module touches a private Lightning or anomalib name (a test reads the
sources for it).

Lightning:

- :class:`DataLoaderSource`, :func:`update_dataloader`, :func:`loop_data_source`: the loops' source of
  dataloaders and the function Lightning itself uses to re-create a loader with another sampler; the
  distributed evaluation of :mod:`~anomalib_faprompt.distributed` shards each image once through them.
- :func:`attached_trainer`: a module's trainer, or ``None`` (``LightningModule.trainer`` raises when detached).
- :func:`set_default_root_dir`: the trainer's folder, which has no setter (rank 0's folder for every process).
- :func:`rich_bar_settings`: a rich progress bar's ``leave`` and console settings, to copy the bar.

anomalib:

- :func:`read_splits`: a datamodule's reading of its splits from disk without its split modes (``_setup``).
- :class:`EngineWithoutVersionFolders`: an ``Engine`` that writes into its folder itself (``_setup_workspace``).
- :func:`set_default_thresholds`, :func:`set_thresholds`: the post-processor's threshold buffers, which only
  validation data sets.

Example:
    >>> from lightning.pytorch import LightningModule
    >>> attached_trainer(LightningModule()) is None
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from lightning.pytorch.utilities.data import _update_dataloader

#: The versions the shims were written and tested against; the package's dependency bounds follow them.
TESTED_WITH = {"lightning": ("2.6", "2.6"), "anomalib": ("2.7", "2.7")}


class CompatibilityError(RuntimeError):
    """An installed Lightning or anomalib lacks a private name this package relies on."""


def require(owner: Any, name: str, where: str) -> Any:
    """``getattr(owner, name)``, or a :class:`CompatibilityError` naming the library versions tested.

    Raises:
        CompatibilityError: If ``owner`` has no attribute ``name``.
    """
    if not hasattr(owner, name):
        tested = ", ".join(f"{library} {low}-{high}" for library, (low, high) in TESTED_WITH.items())
        msg = (
            f"anomalib-faprompt relies on {where}.{name}, which the installed version does not have; it was tested "
            f"with {tested}. Install versions in that range (pip install 'anomalib-faprompt' resolves them)."
        )
        raise CompatibilityError(msg)
    return getattr(owner, name)


# Lightning ----------------------------------------------------------------------------------------------------------

#: A loop's source of dataloaders (Lightning's ``_DataLoaderSource``: ``instance``, ``name``, ``dataloader()``).
DataLoaderSource = _DataLoaderSource


def update_dataloader(loader: Any, sampler: Any) -> Any:
    """``loader`` re-created with ``sampler``, its other arguments kept (what Lightning does for its samplers)."""
    return _update_dataloader(loader, sampler)


def loop_data_source(loop: Any) -> Any:
    """The source a Lightning loop takes its dataloaders from."""
    return require(loop, "_data_source", f"{type(loop).__name__}")


def set_loop_data_source(loop: Any, source: Any) -> None:
    """Make ``loop`` take its dataloaders from ``source``."""
    require(loop, "_data_source", f"{type(loop).__name__}")
    loop._data_source = source


def attached_trainer(module: Any) -> Any:
    """The trainer a ``LightningModule`` is attached to, or ``None`` (``module.trainer`` raises then)."""
    return require(module, "_trainer", "lightning.pytorch.LightningModule")


def set_default_root_dir(trainer: Any, path: str) -> None:
    """Give a trainer another ``default_root_dir`` (the property has no setter)."""
    require(trainer, "_default_root_dir", "lightning.pytorch.Trainer")
    trainer._default_root_dir = path


def rich_bar_settings(bar: Any) -> dict[str, Any]:
    """The constructor arguments of a ``RichProgressBar`` that it keeps only privately (``leave``, console)."""
    return {
        "leave": require(bar, "_leave", "lightning.pytorch.callbacks.RichProgressBar"),
        "console_kwargs": require(bar, "_console_kwargs", "lightning.pytorch.callbacks.RichProgressBar"),
    }


# anomalib -----------------------------------------------------------------------------------------------------------


def read_splits(datamodule: Any) -> None:
    """Read a datamodule's splits from disk as its dataset defines them, without ``setup``'s split modes."""
    require(datamodule, "_setup", "anomalib.data.AnomalibDataModule")()


def _engine_without_version_folders() -> type:
    from anomalib.engine import Engine

    require(Engine, "_setup_workspace", "anomalib.engine.Engine")

    class EngineWithoutVersionFolders(Engine):
        """anomalib's ``Engine`` writing into its ``default_root_dir`` itself, without ``<Model>/<Dataset>/v<N>``.

        ``Engine`` nests its outputs in a new versioned folder (with a ``latest`` link) at every fit and test; a
        caller that names its folders itself (the ``zero_shot`` pipeline) skips that step, as anomalib's
        tiled-ensemble engine does.
        """

        def _setup_workspace(self, *args: Any, **kwargs: Any) -> None:
            del args, kwargs

    return EngineWithoutVersionFolders


def __getattr__(name: str) -> Any:
    # anomalib.engine imports anomalib.models, which imports this package: the Engine subclass is made on first use.
    if name == "EngineWithoutVersionFolders":
        globals()[name] = _engine_without_version_folders()
        return globals()[name]
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Thresholds and normalisation ranges of anomalib's post-processor (scores and maps)."""

    image_threshold: float
    image_min: float
    image_max: float
    pixel_threshold: float
    pixel_min: float
    pixel_max: float


def set_default_thresholds(post_processor: Any, thresholds: Thresholds) -> bool:
    """Give a post-processor without statistics these thresholds and ranges; ``False`` if it had statistics.

    anomalib's ``PostProcessor`` keeps them in buffers that only its validation hooks (or a checkpoint) fill; the
    threshold buffers are private (``_image_threshold``, ``_pixel_threshold``).
    """
    import torch

    buffers = _threshold_buffers(post_processor)
    if not all(torch.isnan(buffer).all() for buffer in buffers.values()):
        return False
    set_thresholds(post_processor, thresholds)
    return True


def set_thresholds(post_processor: Any, thresholds: Thresholds) -> None:
    """Write these thresholds and ranges into a post-processor's buffers, whatever they held (a calibration)."""
    buffers = _threshold_buffers(post_processor)
    for name, value in dataclasses.asdict(thresholds).items():
        buffers[THRESHOLD_BUFFERS[name]].fill_(value)


#: Fields of :class:`Thresholds` and the ``PostProcessor`` buffers that hold them.
THRESHOLD_BUFFERS = {
    "image_threshold": "_image_threshold",
    "image_min": "image_min",
    "image_max": "image_max",
    "pixel_threshold": "_pixel_threshold",
    "pixel_min": "pixel_min",
    "pixel_max": "pixel_max",
}


def _threshold_buffers(post_processor: Any) -> dict[str, Any]:
    where = "anomalib.post_processing.PostProcessor"
    return {name: require(post_processor, name, where) for name in THRESHOLD_BUFFERS.values()}
