"""Read and write learned prompts, and check that they are usable where they are loaded.

Three formats load:

- the project's own small file (``save_prompt_weights``): the learned state (parameters and learned
  buffers such as a visual memory, see ``PromptedCLIP.learned_state_names``), whether it was trained,
  and the settings it depends on;
- the authors' released checkpoints, ``{"prompt_learner": state_dict}`` (SPEC §3);
- a Lightning checkpoint of one of the methods (its learned state is taken).

Each holds prompts of one method, and loading them into another method is refused naming both. The
method is never guessed: prompt files and Lightning checkpoints record it (``method``, and
``checkpoint["prompt_settings"]["method"]``); released checkpoints and Lightning checkpoints written
before checkpoints recorded it are recognised by the keys their method's entry in
:data:`anomalib_faprompt.methods.METHODS` declares (``released_prompts``, ``unrecorded_checkpoint``),
and refused when they match no entry. Every format is refused when it holds non-finite values.

Prompts only make sense with the CLIP and the settings they were learned with, so a prompt file
(version 2) records them (:func:`clip_identity` plus the model's shape settings, see ``PROMPT_SETTINGS``
in ``models/prompt_module.py``) and loading it into a model with other settings is refused with
:class:`SettingsMismatchError`, unless the model is built with ``allow_setting_mismatch=True``.
Lightning checkpoints carry the same record (``checkpoint["prompt_settings"]``); older ones are
compared on their ``hyper_parameters`` (shape settings only: they do not identify the CLIP
weights). Version-1 prompt files are compared on the hyper-parameters they stored, and count as
trained, as they always did. Released checkpoints carry no settings and load as they are.

Example:
    >>> from anomalib_faprompt.prompt_weights import load_prompt_weights  # doctest: +SKIP
    >>> load_prompt_weights(model.model, "AnomalyCLIP_mvtec.pth", "AnomalyCLIP")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.methods import METHODS, recorded_method, released_prompts_methods

FORMAT = "anomalib_faprompt.prompts"
VERSION = 2

#: Bytes hashed at each end of a CLIP weights file to identify it (whole file when smaller than twice this).
IDENTITY_CHUNK = 1 << 20

#: Setting keys that only describe another key for messages; never compared.
_DESCRIPTIONS = {"clip_architecture": "clip_architecture_source", "clip_weights": "clip_weights_source"}

_MISMATCH_ADVICE = (
    "Construct the model with the settings the prompts were learned with, or pass allow_setting_mismatch=True "
    "(CLI: --model.allow_setting_mismatch true) to load them anyway."
)


class NonFiniteValuesError(ValueError):
    """Prompts, inputs or outputs hold NaN or infinite values."""


class SettingsMismatchError(ValueError):
    """Prompts were learned with other settings (CLIP, image size, layers, ...) than the model loading them."""


def plain_data(value: Any) -> Any:
    """``value`` with OmegaConf containers, mappings, sequences and paths as plain dicts, lists and strings.

    Checkpoints are read with ``torch.load(weights_only=True)``, which refuses OmegaConf containers
    (YAML configs give them to the constructors) and anything but plain Python. Other leaves are kept.

    Example:
        >>> from omegaconf import ListConfig
        >>> plain_data({"feature_layers": ListConfig([6, 24]), "betas": (0.5, 0.999)})
        {'feature_layers': [6, 24], 'betas': [0.5, 0.999]}
    """
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, PurePath):
        return str(value)
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:  # pragma: no cover - anomalib depends on omegaconf
        pass
    else:
        if isinstance(value, Container):
            return plain_data(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, Mapping):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [plain_data(item) for item in value]
    return value


def _displayable(value: Any) -> Any:
    """Settings as plain Python for the informational record of a prompt file; unknown objects as text."""
    value = plain_data(value)
    if isinstance(value, dict):
        return {str(key): _displayable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_displayable(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _file_identity(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if size <= 2 * IDENTITY_CHUNK:
            digest.update(file.read())
        else:
            digest.update(file.read(IDENTITY_CHUNK))
            file.seek(-IDENTITY_CHUNK, 2)
            digest.update(file.read(IDENTITY_CHUNK))
    return f"{size} bytes, sha256 of first and last MiB {digest.hexdigest()[:16]}"


def clip_identity(backbone: str | Path, pretrained: str | Path | None) -> dict[str, str]:
    """What identifies the frozen CLIP that prompts were learned on, cheaply.

    The architecture is a hash of its open_clip config (an architecture name and a JSON file with the
    same content are the same architecture). A weights file is identified by its size and a hash of its
    first and last MiB, not by its path (a moved copy is the same weights) and not by hashing the whole
    1.7 GB file on every load; torch and OpenAI JIT files are zip archives whose directory at the end
    holds a CRC of every tensor, so any changed tensor changes the last MiB. An open_clip tag is
    identified by its name: the same weights given as a tag once and as a file once do not compare equal.

    Returns:
        ``clip_architecture`` and ``clip_weights`` (compared), and ``*_source`` (for messages only).
    """
    from anomalib_faprompt.clip.loading import model_config

    config = json.dumps(model_config(backbone), sort_keys=True, default=str)
    identity = {
        "clip_architecture": f"open_clip config sha256 {hashlib.sha256(config.encode()).hexdigest()[:16]}",
        "clip_architecture_source": str(backbone),
    }
    if pretrained is None:
        identity["clip_weights"] = "random initialisation (pretrained=None)"
        identity["clip_weights_source"] = "pretrained=None"
    elif Path(pretrained).is_file():
        identity["clip_weights"] = _file_identity(Path(pretrained))
        identity["clip_weights_source"] = f"file '{Path(pretrained).name}'"
    else:
        identity["clip_weights"] = f"open_clip tag '{pretrained}'"
        identity["clip_weights_source"] = f"tag '{pretrained}'"
    return identity


def settings_mismatches(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between the settings prompts were learned with and the current ones.

    Only keys present on both sides are compared (a released checkpoint or an older file records fewer).
    """
    differences = []
    for key, theirs in recorded.items():
        if key in _DESCRIPTIONS.values() or key not in current:
            continue
        ours = current[key]
        if plain_data(theirs) == plain_data(ours):
            continue
        if key in _DESCRIPTIONS:
            description = _DESCRIPTIONS[key]
            theirs = f"{recorded.get(description, '?')} ({theirs})"
            ours = f"{current.get(description, '?')} ({ours})"
        differences.append(f"{key} is {theirs} there and {ours} here")
    return differences


def check_settings(recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None, source: str) -> None:
    """Refuse prompts learned with other settings than ``current``.

    Raises:
        SettingsMismatchError: Naming every differing setting with both values.
    """
    if not recorded or not current:
        return
    differences = settings_mismatches(recorded, current)
    if differences:
        msg = (
            f"Prompt checkpoint {source} was learned with other settings than this model: "
            + "; ".join(differences)
            + ". "
            + _MISMATCH_ADVICE
        )
        raise SettingsMismatchError(msg)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse parameters holding NaN or infinite values, naming each such parameter.

    Raises:
        NonFiniteValuesError: If any floating-point tensor holds a non-finite value.
    """
    bad = []
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append(f"{name} has {count} non-finite of {value.numel()} values")
    if bad:
        msg = (
            f"Prompt checkpoint {source} holds non-finite values (NaN or inf): " + "; ".join(bad) + ". "
            "Every score would be NaN. Such prompts come from a diverged training run; train again "
            "(e.g. with a lower learning_rate) or load other prompts."
        )
        raise NonFiniteValuesError(msg)


def save_prompt_weights(
    model: PromptedCLIP,
    path: str | Path,
    method: str,
    settings: dict[str, Any],
    prompt_settings: dict[str, Any] | None = None,
    trained: bool = True,
) -> Path:
    """Write the learned state of ``model`` (parameters and learned buffers) to a small standalone file.

    Args:
        model: The torch model.
        path: Destination file.
        method: The method's prompt identity (``prompt_identity`` in :data:`anomalib_faprompt.methods.METHODS`),
            checked at load time.
        settings: The model's hyper-parameters (a record for people; not compared).
        prompt_settings: The settings the prompts depend on, compared when the file is loaded.
        trained: Whether the prompts were trained or loaded as trained. A file written with ``False``
            loads as untrained prompts (only into a model that allows them).

    Returns:
        The path written.

    Raises:
        NonFiniteValuesError: If a parameter or learned buffer holds NaN or infinite values (nothing is written).
    """
    path = Path(path)
    state_dict = model.prompt_state_dict()
    for name, value in state_dict.items():
        count = int((~torch.isfinite(value)).sum())
        if count:
            msg = (
                f"{name} holds {count} non-finite values (NaN or inf); not writing prompts to '{path}'. "
                "Training diverged; train again (e.g. with a lower learning_rate)."
            )
            raise NonFiniteValuesError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "trained": bool(trained),
            "prompt_settings": plain_data(prompt_settings or {}),
            "settings": {key: _displayable(value) for key, value in settings.items()},
            "state_dict": state_dict,
        },
        path,
    )
    return path


def _read(path: Path) -> dict[str, Any]:
    from anomalib.utils.serialization import anomalib_safe_globals

    try:
        with anomalib_safe_globals():
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        hint = ""
        # A truncated zip archive surfaces as OSError (Errno 22), EOFError or torch's stream reader failing.
        if isinstance(error, OSError | EOFError) or "PytorchStreamReader" in str(error):
            hint = " The file looks truncated or damaged (an interrupted copy or write?); write it again."
        elif "omegaconf" in str(error):
            hint = (
                " It was written by an earlier version that stored OmegaConf containers in its hyper-parameters; "
                "re-save its prompts from a trusted session (torch.load(..., weights_only=False)) or retrain."
            )
        msg = f"Could not read prompt weights from '{path}': {error}{hint}"
        raise ValueError(msg) from error
    if not isinstance(content, dict):
        msg = f"'{path}' holds a {type(content).__name__}, not prompt weights."
        raise ValueError(msg)
    return content


@dataclass
class LoadedPrompts:
    """What :func:`load_prompt_weights` found in a file.

    Attributes:
        trained: Whether the file holds trained prompts (``False`` only for files saved untrained).
        settings: The settings the prompts were learned with, or ``None`` when the file records none.
    """

    trained: bool
    settings: dict[str, Any] | None


def hyper_parameter_settings(hyper_parameters: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The compared settings found in a model's hyper-parameters (no CLIP identity: paths are not weights)."""
    return {name: plain_data(hyper_parameters[name]) for name in names if name in hyper_parameters}


def _check_released_method(prompt_learner: Mapping[str, Any], method: str, source: str) -> None:
    """Refuse a released ``prompt_learner`` whose keys are not the declared released format of ``method``."""
    found = released_prompts_methods(prompt_learner)
    if len(found) == 1 and found[0].prompt_identity == method:
        return
    if len(found) == 1:
        theirs = found[0].prompt_identity
        msg = (
            f"{source} is a {theirs} prompt checkpoint (the authors' released format); load it with "
            f"{theirs}(prompt_weights=...), not {method}."
        )
        raise ValueError(msg)
    keys = sorted(prompt_learner)
    msg = (
        f"{source} is in the authors' released format {{'prompt_learner': ...}}, but its keys match "
        + ("no method's released format" if not found else "more than one method's released format")
        + f" (anomalib_faprompt.methods.METHODS): {keys}."
    )
    raise ValueError(msg)


def check_checkpoint_method(checkpoint: Mapping[str, Any], method: str, source: str) -> None:
    """Refuse a Lightning checkpoint written by another method than ``method``, naming both.

    The checkpoint's method is the one it records (``prompt_settings["method"]``), or for checkpoints written
    before they recorded it, the method whose declared ``unrecorded_checkpoint`` keys it has
    (:func:`anomalib_faprompt.methods.recorded_method`).

    Raises:
        ValueError: If the checkpoint is another method's, or records no method and matches no declared keys.
    """
    theirs = recorded_method(checkpoint)
    if theirs == method:
        return
    if theirs is None:
        msg = (
            f"{source} records no method and its learned keys match no method's checkpoint of earlier versions "
            f"(anomalib_faprompt.methods.METHODS); it cannot be loaded into {method}. Load prompts saved by "
            "save_prompt_weights or a checkpoint written by this version."
        )
        raise ValueError(msg)
    msg = f"{source} is a {theirs} checkpoint; load it with {theirs}, not {method}."
    raise ValueError(msg)


def load_prompt_weights(
    model: PromptedCLIP,
    path: str | Path,
    method: str,
    settings: Mapping[str, Any] | None = None,
    *,
    allow_setting_mismatch: bool = False,
) -> LoadedPrompts:
    """Load learned prompts from any supported format into ``model``.

    Args:
        model: The torch model to load into.
        path: Prompt file, released checkpoint or Lightning checkpoint.
        method: The prompt identity of the method ``model`` implements, to refuse another method's prompts.
        settings: The settings of the model loading them (method, CLIP identity, shape settings), compared
            with those the file records. ``None`` compares nothing.
        allow_setting_mismatch: Load prompts learned with other settings anyway.

    Returns:
        Whether the prompts are trained, and the settings the file records.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a prompt checkpoint of ``method`` whose shapes fit.
        SettingsMismatchError: If the file records other settings (unless ``allow_setting_mismatch``).
        NonFiniteValuesError: If it holds NaN or infinite values.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Prompt weights file '{path}' does not exist (prompt_weights=...)."
        raise FileNotFoundError(msg)
    content = _read(path)
    source = f"'{path}'"
    names = tuple(settings or ())
    recorded: dict[str, Any] | None = None
    trained = True
    if "prompt_learner" in content:
        _check_released_method(content["prompt_learner"], method, source)
        state_dict = model.convert_released_state_dict(content["prompt_learner"])
    elif content.get("format") == FORMAT:
        if content["method"] != method:
            msg = f"{source} holds {content['method']} prompts; load it with {content['method']}, not {method}."
            raise ValueError(msg)
        state_dict = content["state_dict"]
        # Version 1 recorded the hyper-parameters only and did not say whether the prompts were trained.
        recorded = content.get("prompt_settings") or hyper_parameter_settings(content.get("settings", {}), names)
        trained = bool(content.get("trained", True))
    elif "state_dict" in content and any(key.startswith("model.") for key in content["state_dict"]):
        check_checkpoint_method(content, method, source)
        learned = set(model.learned_state_names())
        state_dict = {
            key.removeprefix("model."): value
            for key, value in content["state_dict"].items()
            if key.startswith("model.") and key.removeprefix("model.") in learned
        }
        recorded = content.get("prompt_settings") or hyper_parameter_settings(
            content.get("hyper_parameters", {}), names
        )
        ready = content["state_dict"].get("model.prompts_ready")
        trained = True if ready is None else bool(ready)
    else:
        msg = (
            f"{source} is not a prompt checkpoint: expected the released format {{'prompt_learner': ...}}, "
            "a file written by save_prompt_weights, or a Lightning checkpoint of one of the methods "
            f"({', '.join(METHODS)})."
        )
        raise ValueError(msg)
    if not allow_setting_mismatch:
        check_settings(recorded, settings, source)
    check_finite(state_dict, source)
    model.load_prompt_state_dict(state_dict, source, trained=trained)
    return LoadedPrompts(trained=trained, settings=recorded)
