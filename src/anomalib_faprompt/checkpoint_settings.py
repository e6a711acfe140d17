"""A checkpoint rebuilds the model it was trained as: the settings rule of the CLI's ``--ckpt_path``.

With ``--ckpt_path`` (``fit``, ``validate``, ``test``, ``train``, ``predict``,
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
  checkpoint still refuses other CLIP weights when it loads (its CLIP identity check); so may the test-time
  settings the prompts do not depend on (the few-shot references, ``normal_fpr``). ``prompt_weights``,
  ``allow_untrained_prompts``, ``allow_setting_mismatch`` and the pre-/post-processor, evaluator and
  visualiser are not taken from the checkpoint (the checkpoint holds the prompts; the others are choices
  of the run).

``export`` loads the checkpoint into the model built this way (anomalib's ``Engine.export`` would build
a second model from the recorded settings, ignoring a moved ``--model.pretrained``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalib_faprompt.file_integrity import DamagedFileError, check_file
from anomalib_faprompt.methods import METHODS, RUN_TIME_SETTINGS, recorded_method
from anomalib_faprompt.signatures import constructor_parameters

#: Lightning's ``ckpt_path`` values that name no file.
SPECIAL_CHECKPOINTS = frozenset({"best", "last", "hpc", "registry"})

#: Settings taken from the checkpoint when not given, that may be given with another value.
# Test-time settings of few-shot references may differ too: the prompts do not depend on them.
MAY_DIFFER = frozenset(
    {"pretrained", "max_epochs", "k_shot", "few_shot_source", "reference_seed", "reference_weight", "normal_fpr"}
)

#: Constructor arguments never taken from the checkpoint: how this run executes (``inference_compile`` is eager
#: unless given, and given freely: compiled outputs equal eager ones) and anomalib's components.
NOT_FROM_CHECKPOINT = RUN_TIME_SETTINGS | {"pre_processor", "post_processor", "evaluator", "visualizer"}


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
        check_file(path, "Checkpoint --ckpt_path")
    except DamagedFileError as error:
        raise CheckpointSettingsError(str(error)) from error
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
    from anomalib_faprompt.prompt_settings import clip_identity, plain_data

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
    parameters = constructor_parameters(model_class)
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
