"""Make the models and the zero-shot pipeline resolvable by anomalib's short names; nothing else of anomalib changes.

``anomalib.models.get_model("FAPrompt")`` looks among ``AnomalibModule``'s direct subclasses, ``get_model({"class_path":
"FAPrompt"})`` and the CLI look the name up on ``anomalib.models``; ``anomalib <subcommand>`` looks pipelines up in
``anomalib.cli.pipelines.PIPELINE_REGISTRY``. ``anomalib.cli.cli.AnomalibCLI`` gets the hooks of
:mod:`anomalib_faprompt.cli`, which act only when the model (or subcommand) is this package's.

Example:
    >>> import anomalib.models
    >>> import anomalib_faprompt  # registers (the start-up hook does it too, when anomalib.models is imported)
    >>> anomalib.models.FAPrompt is anomalib_faprompt.FAPrompt
    True
"""

from __future__ import annotations

import sys
from typing import Any

#: Whether :func:`register` is running: importing anomalib from it fires the start-up hook, which must wait.
_registering = False


def register() -> None:
    """Expose the methods of :data:`~anomalib_faprompt.methods.METHODS` and our datamodules on anomalib."""
    global _registering
    if _registering:
        return
    _registering = True
    try:
        _register()
    finally:
        _registering = False


def _register() -> None:
    import anomalib.data as anomalib_data

    from . import logs
    from .data import AuxiliaryDataModule, SyntheticAD
    from .methods import METHODS

    # anomalib.data.get_datamodule looks names up there
    anomalib_data.AuxiliaryDataModule = AuxiliaryDataModule
    anomalib_data.SyntheticAD = SyntheticAD

    for name, method in METHODS.items():
        expose_model(name, method.load())
    logs.install_model_filters()
    register_cli()


def expose_model(name: str, model_class: type) -> None:
    """Make ``model_class`` resolvable as ``name`` on ``anomalib.models`` (``--model <name>``, ``get_model``)."""
    import anomalib.models as anomalib_models

    setattr(anomalib_models, name, model_class)
    if name not in anomalib_models.__all__:
        anomalib_models.__all__.append(name)


def expose_method(method: Any) -> None:
    """Check a method entry of :func:`~anomalib_faprompt.methods.register_method` and expose its class on anomalib.

    Raises:
        TypeError: If the class is not a prompt method that anomalib's ``get_model`` finds.
        ValueError: If ``anomalib.models`` has another model of that name.
    """
    import anomalib.models as anomalib_models
    from anomalib.models import AnomalibModule

    from .models.base import PromptMethod

    model_class = method.load()
    if not (issubclass(model_class, PromptMethod) and AnomalibModule in model_class.__bases__):
        msg = (
            f"Method '{method.name}': {model_class.__name__} must subclass PromptMethod "
            f"(anomalib_faprompt.models.base) and list AnomalibModule among its direct bases, e.g. class "
            f"{model_class.__name__}(PromptMethod, AnomalibModule)."
        )
        raise TypeError(msg)
    if model_class.__name__ != method.name or model_class.method_name != method.prompt_identity:
        msg = (
            f"Method '{method.name}': the class is {model_class.__name__} with method_name "
            f"'{model_class.method_name}'; anomalib resolves a model by its class name, so name the entry after it."
        )
        raise ValueError(msg)
    existing = getattr(anomalib_models, method.name, None)
    if existing is not None and existing is not model_class:
        msg = f"Method '{method.name}': anomalib.models already has a model of that name ({existing!r}); rename it."
        raise ValueError(msg)
    expose_model(method.name, model_class)


def withdraw_model(name: str) -> None:
    """Undo :func:`expose_model`."""
    import anomalib.models as anomalib_models

    if name in anomalib_models.__all__:
        anomalib_models.__all__.remove(name)
    if hasattr(anomalib_models, name):
        delattr(anomalib_models, name)


def register_loaded() -> None:
    """Register with every anomalib module that has finished loading (the start-up hook calls this; idempotent)."""
    models = sys.modules.get("anomalib.models")
    if models is not None and hasattr(models, "get_model"):
        register()
    register_pipelines()


def register_cli() -> None:
    """Hook :mod:`anomalib_faprompt.cli` into ``AnomalibCLI`` once ``anomalib.cli.cli`` has loaded (idempotent)."""
    cli_module = sys.modules.get("anomalib.cli.cli")
    cli_class = getattr(cli_module, "AnomalibCLI", None)
    if cli_class is None:
        # Not imported, or part-way through its own imports (it imports anomalib.models, whose hook imports this
        # package): the start-up hook calls this again once the module has finished loading.
        return

    from .cli import install

    install(cli_class)


def register_pipelines() -> None:
    """Add ``zero_shot`` to anomalib's pipeline subcommands once ``anomalib.cli.pipelines`` has loaded (idempotent)."""
    pipelines = sys.modules.get("anomalib.cli.pipelines")
    if getattr(pipelines, "PIPELINE_REGISTRY", None) is None:
        # Not imported, part-way through its own imports (anomalib.engine imports anomalib.models, whose hook imports
        # this package), or without pipelines: the start-up hook registers once the module has finished loading.
        return

    from .pipelines import ZeroShot

    pipelines.PIPELINE_REGISTRY.setdefault("zero_shot", ZeroShot)
