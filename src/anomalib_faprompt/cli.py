"""anomalib's CLI rebuilds our methods from their checkpoints and reports their errors in one line.

:func:`install` wraps three methods of ``anomalib.cli.cli.AnomalibCLI`` (it runs when that module is
imported, see ``registration.register_cli``); models and datamodules of other packages are left alone.
"Our methods" are those of :data:`anomalib_faprompt.methods.METHODS` (AnomalyCLIP, FAPrompt) and their
subclasses.

**Checkpoints that remember.** With ``--ckpt_path`` (``fit``, ``validate``, ``test``, ``train``, ``predict``,
``export``) and ``--model`` one of our methods (e.g. ``--model FAPrompt``), the model is built with the settings
recorded in the checkpoint's ``hyper_parameters`` before anything is instantiated, so

.. code-block:: bash

    anomalib test --model FAPrompt --ckpt_path results/.../model.ckpt --data MVTecAD --data.category bottle
    anomalib export --model FAPrompt --ckpt_path results/.../model.ckpt --export_type openvino

need no other model option. The rule, per constructor argument recorded in the checkpoint:

- *not given* (neither on the command line nor in a config file): the checkpoint's value;
- *given*, equal to the checkpoint's value: accepted (a backbone counts as equal when its open_clip
  config is the same, e.g. a moved JSON file);
- *given*, different: refused with :class:`CheckpointSettingsError`, naming each setting with both
  values, unless ``--model.allow_setting_mismatch true`` is given too (the given values are then used).
  A value counts as given when it appears in the command line or in a config file, even when it
  equals the class default: the arguments are parsed a second time without defaults to tell.
- exceptions: ``pretrained`` and ``max_epochs`` may differ (moved CLIP weights, training longer): the
  checkpoint still refuses other CLIP weights when it loads (its CLIP identity check). ``prompt_weights``,
  ``allow_untrained_prompts``, ``allow_setting_mismatch`` and the pre-/post-processor, evaluator and
  visualiser are not taken from the checkpoint (the checkpoint holds the prompts; the others are choices
  of the run).

``export`` loads the checkpoint into the model built this way (anomalib's ``Engine.export`` would build
a second model from the recorded settings, ignoring a moved ``--model.pretrained``).

**Seeded.** ``seed_everything: <int>`` seeds before the classes are built, as anomalib's help says but its
CLI does not do (see :func:`_apply_seed`).

**Errors in one line.** jsonargparse reports an exception raised while it builds a model inside a
~300-line "Does not validate against any of the Union subtypes" dump. The errors our models and
datamodules raise for bad settings (missing CLIP weights, settings out of range, prompt files) and
the checkpoint refusals above end the program instead with ``error: <message>`` as the last line of
stderr and exit status 2.
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

from anomalib_faprompt.methods import METHODS, RUN_TIME_SETTINGS, method_classes, recorded_method

#: Subcommands whose ``--ckpt_path`` rebuilds the model.
CHECKPOINT_SUBCOMMANDS = frozenset({"fit", "validate", "test", "train", "predict", "export"})

#: Lightning's ``ckpt_path`` values that name no file.
_SPECIAL_CHECKPOINTS = frozenset({"best", "last", "hpc", "registry"})

#: Settings taken from the checkpoint when not given, that may be given with another value.
# Test-time settings of few-shot references may differ too: the prompts do not depend on them.
MAY_DIFFER = frozenset({"pretrained", "max_epochs", "k_shot", "few_shot_source", "reference_seed", "reference_weight"})

#: Constructor arguments never taken from the checkpoint: how this run executes (``inference_compile`` is eager
#: unless given, and given freely: compiled outputs equal eager ones) and anomalib's components.
NOT_FROM_CHECKPOINT = RUN_TIME_SETTINGS | {"pre_processor", "post_processor", "evaluator", "visualizer"}

_MARKER = "_anomalib_faprompt_installed"
_ARGS = "_anomalib_faprompt_args"
_CHECKPOINT = "_anomalib_faprompt_checkpoint"

#: Exceptions raised while jsonargparse instantiates our classes, while it does so.
_raised: ContextVar[list[BaseException] | None] = ContextVar("anomalib_faprompt_raised", default=None)


class CheckpointSettingsError(ValueError):
    """The settings given to the CLI contradict those the checkpoint was trained with, or it is no usable checkpoint."""


# Reading the checkpoint -------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, model_class: type) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU, memory-mapped (cheap: only what is used is read).

    Raises:
        CheckpointSettingsError: If the file is missing or unreadable.
    """
    import torch
    from anomalib.utils.serialization import anomalib_safe_globals

    path = Path(path)
    if not path.is_file():
        msg = f"--ckpt_path '{path}' does not exist."
        raise CheckpointSettingsError(msg)
    extra = getattr(model_class, "checkpoint_safe_globals", lambda: [])()
    try:
        with anomalib_safe_globals(extra=extra):
            try:
                content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                content = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except Exception as error:
        msg = f"Could not read the checkpoint --ckpt_path '{path}': {' '.join(str(error).split())}"
        raise CheckpointSettingsError(msg) from error
    if not isinstance(content, dict) or not isinstance(content.get("hyper_parameters"), Mapping):
        msg = f"--ckpt_path '{path}' is not a Lightning checkpoint with hyper-parameters."
        raise CheckpointSettingsError(msg)
    return content


def checkpoint_method(checkpoint: Mapping[str, Any]) -> str | None:
    """The prompt identity of the method that wrote the checkpoint, ``None`` if it is none of ours.

    As :func:`anomalib_faprompt.methods.recorded_method`: the recorded method, or for checkpoints written before
    checkpoints recorded it, the method whose declared keys it has.
    """
    return recorded_method(checkpoint)


# The settings rule ------------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _same_setting(name: str, given: Any, recorded: Any, checkpoint: Mapping[str, Any]) -> bool:
    from anomalib_faprompt.prompt_weights import clip_identity, plain_data

    if plain_data(given) == plain_data(recorded):
        return True
    if name != "backbone":
        return False
    try:  # the same open_clip config under another name or path is the same architecture
        architecture = clip_identity(given, None)["clip_architecture"]
        recorded_architecture = (checkpoint.get("prompt_settings") or {}).get("clip_architecture")
        return architecture == (recorded_architecture or clip_identity(recorded, None)["clip_architecture"])
    except (OSError, ValueError):
        return False


def settings_from_checkpoint(
    model_class: type,
    init_args: Mapping[str, Any],
    given: set[str],
    checkpoint: Mapping[str, Any],
    source: str | Path,
) -> dict[str, Any]:
    """``init_args`` with the checkpoint's settings where none was given (the rule in the module docstring).

    Args:
        model_class: The model class the CLI builds.
        init_args: Its constructor arguments as parsed (defaults filled in).
        given: Names of the arguments given on the command line or in a config file.
        checkpoint: The Lightning checkpoint (``hyper_parameters``, ``prompt_settings``, ``state_dict``).
        source: The checkpoint's path, for messages.

    Returns:
        The constructor arguments to build the model with.

    Raises:
        CheckpointSettingsError: If the checkpoint is of another model, or a given setting contradicts it.
    """
    name = model_class.__name__
    method = checkpoint_method(checkpoint)
    expected = getattr(model_class, "method_name", name)
    if method != expected:
        held = f"holds a {method} checkpoint" if method else f"is not a checkpoint of {' or '.join(METHODS)}"
        hint = f"; use --model {method}" if method else ""
        msg = f"--ckpt_path '{source}' {held}, not one of {name}{hint}."
        raise CheckpointSettingsError(msg)
    parameters = inspect.signature(model_class.__init__).parameters
    override = "allow_setting_mismatch" in given and bool(init_args.get("allow_setting_mismatch"))
    settings = dict(init_args)
    conflicts = []
    for key, recorded in checkpoint["hyper_parameters"].items():
        if key not in parameters or key in NOT_FROM_CHECKPOINT:
            continue
        if key not in given:
            settings[key] = recorded
        elif not (key in MAY_DIFFER or override or _same_setting(key, init_args.get(key), recorded, checkpoint)):
            given_value = _shown(init_args.get(key))
            conflicts.append(f"{key} is {_shown(recorded)} in the checkpoint but {given_value} was given")
    if conflicts:
        msg = (
            f"--ckpt_path '{source}' holds a {name} trained with other settings than given on the command line or in "
            f"a config file: {'; '.join(conflicts)}. Leave these settings out to use the checkpoint's values, or add "
            "--model.allow_setting_mismatch true to build the model with the given ones."
        )
        raise CheckpointSettingsError(msg)
    return settings


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
    defaults = inspect.signature(model_class.__init__).parameters
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
    if model_class is None or not ckpt_path or str(ckpt_path) in _SPECIAL_CHECKPOINTS:
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
    from anomalib_faprompt.models.prompt_module import UntrainedPromptsError

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
        if isinstance(candidate, ValueError | OSError):
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
    """Seed as ``seed_everything: <int>`` says, before any class is built (the model's initial prompts included).

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
        setattr(self, _ARGS, list(arguments) if arguments is not None else sys.argv[1:])
        original_init(self, *args, **kwargs)

    @functools.wraps(original_before)
    def before_instantiate_classes(self: Any) -> None:
        original_before(self)
        _apply_seed(self)
        try:
            _fill_from_checkpoint(self)
        except CheckpointSettingsError as error:
            _exit(error)
        for parser in (self.parser, *getattr(self, "subcommand_parsers", {}).values()):
            for class_type in _our_classes():
                parser.add_instantiator(_recording_instantiator, class_type, subclasses=True)

    @functools.wraps(original_instantiate)
    def instantiate_classes(self: Any) -> None:
        raised: list[BaseException] = []
        token = _raised.set(raised)
        try:
            original_instantiate(self)
            _load_checkpoint_for_export(self)
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
