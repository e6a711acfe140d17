"""anomalib's CLI rebuilds our methods from their checkpoints and reports their errors in one line.

:func:`install` wraps three methods of ``anomalib.cli.cli.AnomalibCLI`` (it runs when that module is
imported, see ``registration.register_cli``); what the wrappers do applies to our methods, datamodules and
subcommand only, so a run of any other model (``anomalib train --model Patchcore``) is anomalib's, unchanged.
"Our methods" are those of :data:`anomalib_faprompt.methods.METHODS` (the built-in ones and those registered with
``register_method``) and their subclasses.

**Checkpoints that remember.** With ``--ckpt_path`` and ``--model`` one of our methods, the model is built with the
settings recorded in the checkpoint before anything is instantiated (the rule:
:mod:`~anomalib_faprompt.checkpoint_settings`), so ``anomalib test --model FAPrompt --ckpt_path .../model.ckpt``
needs no other model option. ``export`` loads the checkpoint into the model built this way (anomalib's
``Engine.export`` would build a second model from the recorded settings, ignoring a moved ``--model.pretrained``).

**Seeded, with a tidy console.** For our methods, ``seed_everything: <int>`` seeds before the classes are built, as
anomalib's help says but its CLI does not do (see :func:`_apply_seed`), and the console is tidied
(:func:`~anomalib_faprompt.logs.tidy_console`), as for ``anomalib zero_shot`` from its start.

**Errors in one line.** jsonargparse reports an exception raised while it builds a model inside a
~300-line "Does not validate against any of the Union subtypes" dump. The errors our models and
datamodules raise for bad settings (missing CLIP weights, settings out of range, prompt files that are damaged or
not prompt files), the checkpoint refusals above and an export's ``--compression_type`` whose package is missing
(checked before any export work) end the program instead with ``error: <message>`` as the last line of stderr and
exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from anomalib_faprompt.checkpoint_settings import (
    SPECIAL_CHECKPOINTS,
    CheckpointSettingsError,
    read_checkpoint,
    settings_from_checkpoint,
)
from anomalib_faprompt.logs import tidy_console
from anomalib_faprompt.methods import method_classes
from anomalib_faprompt.signatures import constructor_parameters

#: Subcommands whose ``--ckpt_path`` rebuilds the model.
CHECKPOINT_SUBCOMMANDS = frozenset({"fit", "validate", "test", "train", "predict", "export"})

#: This package's subcommand, whose runs get a tidy console from their start.
OUR_SUBCOMMAND = "zero_shot"

_MARKER = "_anomalib_faprompt_installed"
_ARGS = "_anomalib_faprompt_args"
_CHECKPOINT = "_anomalib_faprompt_checkpoint"

#: Exceptions raised while jsonargparse instantiates our classes, while it does so.
_raised: ContextVar[list[BaseException] | None] = ContextVar("anomalib_faprompt_raised", default=None)


# Hooks into AnomalibCLI -----------------------------------------------------------------------------------------


def _our_model_class(model_config: Any) -> type | None:
    """The class of ``--model`` when it is one of our methods (or a subclass of one), else ``None``."""
    class_path = getattr(model_config, "class_path", None) if model_config is not None else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    return model_class if isinstance(model_class, type) and issubclass(model_class, tuple(method_classes())) else None


def _given_init_args(cli: Any, subcommand: str, model_class: type, init_args: Mapping[str, Any]) -> set[str]:
    """Names of the model arguments given on the command line or in config files.

    The arguments are parsed again without defaults (what jsonargparse then returns was given). Should
    that parse fail, the arguments whose values differ from the class defaults count as given.
    """
    arguments = getattr(cli, _ARGS, None)
    parsers = [cli.parser, *getattr(cli, "subcommand_parsers", {}).values()]
    exit_on_error = [parser.exit_on_error for parser in parsers]
    explicit = None
    if arguments is not None:
        try:
            for parser in parsers:
                parser.exit_on_error = False
            # anomalib links --default_root_dir to the trainer's, and the link needs a value.
            explicit = cli.parser.parse_args([*arguments, "--default_root_dir=."], defaults=False)
        except (Exception, SystemExit):
            explicit = None
        finally:
            for parser, value in zip(parsers, exit_on_error, strict=True):
                parser.exit_on_error = value
    if explicit is not None:
        model = (explicit.get(subcommand) or {}).get("model")
        given_args = getattr(model, "init_args", None) if model is not None else None
        return set(vars(given_args)) if given_args is not None else set()
    defaults = constructor_parameters(model_class)
    return {
        name
        for name, value in init_args.items()
        if name in defaults and value != defaults[name].default and value is not inspect.Parameter.empty
    }


def _fill_from_checkpoint(cli: Any) -> None:
    subcommand = cli.config["subcommand"]
    if subcommand not in CHECKPOINT_SUBCOMMANDS:
        return
    config = cli.config[subcommand]
    ckpt_path = config.get("ckpt_path")
    model_config = config.get("model")
    model_class = _our_model_class(model_config)
    if model_class is None or not ckpt_path or str(ckpt_path) in SPECIAL_CHECKPOINTS:
        return
    checkpoint = read_checkpoint(ckpt_path, model_class)
    init_args = model_config.init_args
    current = dict(vars(init_args)) if init_args is not None else {}
    given = _given_init_args(cli, subcommand, model_class, current)
    settings = settings_from_checkpoint(model_class, current, given, checkpoint, ckpt_path)
    for key, value in settings.items():
        if key not in current or current[key] != value:
            init_args[key] = value
    if subcommand == "export":
        setattr(cli, _CHECKPOINT, checkpoint)


def _load_checkpoint_for_export(cli: Any) -> None:
    """Load the checkpoint into the model the CLI built, instead of letting ``Engine.export`` build another."""
    checkpoint = getattr(cli, _CHECKPOINT, None)
    if cli.config["subcommand"] != "export" or checkpoint is None or getattr(cli, "model", None) is None:
        return
    # What Lightning's load_from_checkpoint does once the model is built.
    cli.model.on_load_checkpoint(checkpoint)
    cli.model.load_state_dict(checkpoint["state_dict"], strict=cli.model.strict_loading)
    cli.config_init["export"]["ckpt_path"] = None


def _check_export_compression(cli: Any) -> None:
    """Refuse ``--compression_type`` whose package or data is missing before the export's work (tracing, converting)."""
    model = getattr(cli, "model", None)
    if cli.config["subcommand"] != "export" or not isinstance(model, tuple(method_classes())):
        return
    from anomalib_faprompt.export import check_calibration_data, check_compression

    export = cli.config["export"]
    check_compression(export.get("compression_type"), model.method_name, export.get("export_type"))
    check_calibration_data(export.get("compression_type"), getattr(cli, "datamodule", None), model.method_name)


def _recording_instantiator(class_type: type, *args: Any, **kwargs: Any) -> Any:
    try:
        return class_type(*args, **kwargs)
    except Exception as error:
        raised = _raised.get()
        if raised is not None:
            raised.append(error)
        raise


def _our_classes() -> list[type]:
    from anomalib.data import AnomalibDataModule

    from anomalib_faprompt import data

    classes: list[type] = method_classes()
    for name in getattr(data, "__all__", ()):
        value = getattr(data, name, None)
        if isinstance(value, type) and issubclass(value, AnomalibDataModule):
            classes.append(value)
    return classes


def _user_error(error: BaseException, raised: list[BaseException]) -> BaseException | None:
    """Our error behind ``error`` (recorded while instantiating, or in its chain) meant for the user, if any."""
    from anomalib_faprompt.models.readiness import UntrainedPromptsError

    package = Path(__file__).resolve().parent
    candidates: list[BaseException] = list(raised)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        candidates.append(current)
        current = current.__cause__ or current.__context__
    for candidate in candidates:
        if isinstance(candidate, CheckpointSettingsError | UntrainedPromptsError):
            return candidate
        if isinstance(candidate, ValueError | OSError | ImportError):
            traceback = candidate.__traceback__
            while traceback is not None and traceback.tb_next is not None:
                traceback = traceback.tb_next
            origin = Path(traceback.tb_frame.f_code.co_filename).resolve() if traceback is not None else None
            if origin is not None and package in origin.parents:
                return candidate
    return None


@contextmanager
def settings_errors_in_one_line(*also: type[BaseException]) -> Iterator[None]:
    """End the program with ``error: <message>`` (exit status 2) for an error our code raised about its settings.

    As for ``anomalib train/test``: a ``ValueError`` or ``OSError`` raised in this package (or one of ``also``)
    becomes one line; anything else keeps its traceback.
    """
    try:
        yield
    except (ValueError, OSError, *also) as error:
        ours = error if isinstance(error, also) else _user_error(error, [])
        if ours is None:
            raise
        _exit(ours)


def _exit(error: BaseException) -> None:
    """End the program with the error's message as the last line of stderr."""
    message = " ".join(str(error).split())
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _apply_seed(cli: Any) -> None:
    """Seed a run of our models as ``seed_everything: <int>`` says, before any class is built (their prompts included).

    anomalib 2.7's CLI parses ``--seed_everything`` ("run seed_everything with this value before classes
    instantiation") but never applies it: every ``anomalib train`` started from other random prompts, and a run
    over several processes (``--trainer.strategy ddp``) could not be compared with one process's. ``True`` (a
    random seed, anomalib's default) and ``False`` are left as they were.
    """
    subcommand = cli.config.get("subcommand")
    config = cli.config.get(subcommand, cli.config) if subcommand else cli.config
    seed = config.get("seed_everything") if hasattr(config, "get") else None
    if isinstance(seed, int) and not isinstance(seed, bool):
        from lightning.pytorch import seed_everything

        seed_everything(seed, workers=True)


def install(cli_class: type) -> None:
    """Wrap ``cli_class``'s ``__init__``, ``before_instantiate_classes`` and ``instantiate_classes`` (idempotent)."""
    if cli_class.__dict__.get(_MARKER):
        return
    original_init: Callable[..., None] = cli_class.__init__
    original_before: Callable[[Any], None] = cli_class.before_instantiate_classes
    original_instantiate: Callable[[Any], None] = cli_class.instantiate_classes

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        arguments = kwargs.get("args", args[0] if args else None)
        arguments = list(arguments) if arguments is not None else sys.argv[1:]
        setattr(self, _ARGS, arguments)
        if arguments[:1] == [OUR_SUBCOMMAND]:
            tidy_console()
        original_init(self, *args, **kwargs)

    @functools.wraps(original_before)
    def before_instantiate_classes(self: Any) -> None:
        original_before(self)
        # Only our classes are touched: their errors in one line (datamodules included), and for our models the
        # checkpoint's settings, the seed and a tidy console. Any other model runs as anomalib runs it.
        for parser in (self.parser, *getattr(self, "subcommand_parsers", {}).values()):
            for class_type in _our_classes():
                parser.add_instantiator(_recording_instantiator, class_type, subclasses=True)
        subcommand = self.config.get("subcommand")
        if not subcommand or _our_model_class(self.config[subcommand].get("model")) is None:
            return
        tidy_console()
        _apply_seed(self)
        try:
            _fill_from_checkpoint(self)
        except CheckpointSettingsError as error:
            _exit(error)

    @functools.wraps(original_instantiate)
    def instantiate_classes(self: Any) -> None:
        raised: list[BaseException] = []
        token = _raised.set(raised)
        try:
            original_instantiate(self)
            _load_checkpoint_for_export(self)
            _check_export_compression(self)
        except Exception as error:
            ours = _user_error(error, raised)
            if ours is None:
                raise
            _exit(ours)
        finally:
            _raised.reset(token)

    cli_class.__init__ = __init__
    cli_class.before_instantiate_classes = before_instantiate_classes
    cli_class.instantiate_classes = instantiate_classes
    setattr(cli_class, _MARKER, True)


def main() -> None:
    """``anomalib`` with this package registered first: the CLI where start-up hooks do not run.

    ``pip install`` adds a start-up hook that registers the short names (``--model FAPrompt``, ``anomalib
    zero_shot``) when anomalib loads. Where hooks do not run (``python -S``, some packagers), ``anomalib-faprompt``
    takes the same arguments as ``anomalib``; plain ``anomalib`` then needs full class paths
    (``--model anomalib_faprompt.FAPrompt``) and has no ``zero_shot``.
    """
    from anomalib.cli import cli as anomalib_cli

    from anomalib_faprompt.registration import register_loaded

    register_loaded()
    anomalib_cli.main()
