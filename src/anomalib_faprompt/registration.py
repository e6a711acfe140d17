"""Make the models and the zero-shot pipeline resolvable by anomalib's short names.

``anomalib.models.get_model("FAPrompt")`` looks among ``AnomalibModule``'s direct subclasses,
``get_model({"class_path": "FAPrompt"})`` and the CLI look the name up on ``anomalib.models``;
``anomalib <subcommand>`` looks pipelines up in ``anomalib.cli.pipelines.PIPELINE_REGISTRY``.
``anomalib.cli.cli.AnomalibCLI`` gets the hooks of :mod:`anomalib_faprompt.cli` (checkpoints rebuild
our models; their errors end the program in one line).
"""

from __future__ import annotations


def register() -> None:
    """Expose the methods of :data:`~anomalib_faprompt.methods.METHODS` and our datamodules on anomalib."""
    import anomalib.data as anomalib_data
    import anomalib.models as anomalib_models

    from .data import AuxiliaryDataModule, SyntheticAD
    from .methods import METHODS

    # anomalib.data.get_datamodule looks names up there
    anomalib_data.AuxiliaryDataModule = AuxiliaryDataModule
    anomalib_data.SyntheticAD = SyntheticAD

    for name, method in METHODS.items():
        setattr(anomalib_models, name, method.load())
        if name not in anomalib_models.__all__:
            anomalib_models.__all__.append(name)

    register_cli()


def register_cli() -> None:
    """Hook :mod:`anomalib_faprompt.cli` into ``AnomalibCLI`` once ``anomalib.cli.cli`` has loaded (idempotent)."""
    import sys

    cli_module = sys.modules.get("anomalib.cli.cli")
    cli_class = getattr(cli_module, "AnomalibCLI", None)
    if cli_class is None:
        # Not imported, or part-way through its own imports (it imports anomalib.models, whose hook imports this
        # package): the start-up hook calls this again once the module has finished loading.
        return

    from .cli import install

    install(cli_class)


def register_pipelines() -> None:
    """Add ``zero_shot`` to anomalib's pipeline subcommands (idempotent)."""
    import importlib
    import sys

    pipelines = sys.modules.get("anomalib.cli.pipelines") or importlib.import_module("anomalib.cli.pipelines")
    if not hasattr(pipelines, "PIPELINE_REGISTRY"):
        # anomalib.cli.pipelines is part-way through its own imports (anomalib.engine imports anomalib.models,
        # whose hook imports this package): the start-up hook registers once the module has finished loading.
        return

    from .pipelines import ZeroShot

    if pipelines.PIPELINE_REGISTRY is not None:
        pipelines.PIPELINE_REGISTRY.setdefault("zero_shot", ZeroShot)
