"""Read and write learned prompts, and check that they are usable where they are loaded.

Three formats load:

- the project's own small file (``save_prompt_weights``): the learned state (parameters and learned
  buffers such as a visual memory, see ``PromptedCLIP.learned_state_names``), whether it was trained,
  and the settings it depends on;
- the authors' released checkpoints, ``{"prompt_learner": state_dict}`` (AnomalyCLIP and FAPrompt READMEs: Method);
- a Lightning checkpoint of one of the methods (its learned state is taken).

Each holds prompts of one method, and loading them into another method is refused naming both. The
method is never guessed: prompt files and Lightning checkpoints record it (``method``, and
``checkpoint["prompt_settings"]["method"]``); released checkpoints and Lightning checkpoints written
before checkpoints recorded it are recognised by the keys their method's entry in
:data:`anomalib_faprompt.methods.METHODS` declares (``released_prompts``, ``unrecorded_checkpoint``),
and refused when they match no entry. Every format is refused when it holds non-finite values.

Prompts only make sense with the CLIP and the settings they were learned with, so a prompt file
(version 2) records them and loading it into a model with other settings is refused
(:mod:`~anomalib_faprompt.prompt_settings`). Lightning checkpoints carry the same record
(``checkpoint["prompt_settings"]``); older ones are compared on their ``hyper_parameters`` (shape settings only:
they do not identify the CLIP weights). Version-1 prompt files are compared on the hyper-parameters they stored,
and count as trained, as they always did. Released checkpoints carry no settings and load as they are.

Example:
    >>> from anomalib_faprompt.prompt_weights import load_prompt_weights  # doctest: +SKIP
    >>> load_prompt_weights(model.model, "AnomalyCLIP_mvtec.pth", "AnomalyCLIP")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP
from anomalib_faprompt.file_integrity import check_file
from anomalib_faprompt.methods import METHODS, recorded_method, released_prompts_methods
from anomalib_faprompt.prompt_settings import (
    SettingsMismatchError,
    check_settings,
    displayable,
    hyper_parameter_settings,
    plain_data,
)

__all__ = [
    "LoadedPrompts",
    "NonFiniteValuesError",
    "SettingsMismatchError",
    "check_checkpoint_method",
    "check_finite",
    "load_prompt_weights",
    "read_torch_file",
    "save_prompt_weights",
]

FORMAT = "anomalib_faprompt.prompts"
VERSION = 2


class NonFiniteValuesError(ValueError):
    """Prompts, inputs or outputs hold NaN or infinite values."""


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
    _check_finite_before_saving(state_dict, path)
    _prepare_destination(path)
    content = {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "trained": bool(trained),
        "prompt_settings": plain_data(prompt_settings or {}),
        "settings": {key: displayable(value) for key, value in settings.items()},
        "state_dict": state_dict,
    }
    try:
        torch.save(content, path)
    except (OSError, RuntimeError) as error:  # torch reports an unwritable path as RuntimeError (its zip writer)
        msg = f"Cannot save prompt weights to '{path}': {' '.join(str(error).split())}"
        raise OSError(msg) from error
    return path


def _check_finite_before_saving(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    for name, value in state_dict.items():
        count = int((~torch.isfinite(value)).sum())
        if count:
            msg = (
                f"{name} holds {count} non-finite values (NaN or inf); not writing prompts to '{path}'. "
                "Training diverged; train again (e.g. with a lower learning_rate)."
            )
            raise NonFiniteValuesError(msg)


def _prepare_destination(path: Path) -> None:
    if path.is_dir():
        msg = (
            f"Cannot save prompt weights to '{path}': it is a directory. Give a file path, e.g. "
            f"'{path / 'prompts.pt'}'."
        )
        raise IsADirectoryError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        msg = f"Cannot save prompt weights to '{path}': its folder cannot be created ({error})."
        raise OSError(msg) from error


def read_torch_file(path: Path, role: str, extra_globals: Sequence[Any] = ()) -> Any:
    """Load a torch file on the CPU with ``weights_only=True``, refusing damaged or foreign files by name.

    The archive's checksums are compared first (:func:`~anomalib_faprompt.file_integrity.check_file`): torch
    would load a file whose tensor bytes changed on disk without a word.

    Args:
        path: The file.
        role: What it is, for messages (``"Prompt weights file"``).
        extra_globals: Classes to allow when unpickling, beside anomalib's.

    Raises:
        DamagedFileError: If its bytes do not match the checksums it was written with, or it is cut short.
        ValueError: If torch cannot read it (not a torch file, truncated, written with objects
            ``weights_only`` refuses), naming the file.
    """
    from anomalib.utils.serialization import anomalib_safe_globals

    check_file(path, role)
    if path.stat().st_size == 0:
        msg = f"Could not read {role.lower()} '{path}': the file is empty (0 bytes; an interrupted write?)."
        raise ValueError(msg)
    try:
        with anomalib_safe_globals(extra=list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign bytes (KeyError, UnpicklingError, ...)
        reason = " ".join(str(error).split()) or type(error).__name__
        if "omegaconf" in reason:
            hint = (
                " It was written by an earlier version that stored OmegaConf containers in its hyper-parameters; "
                "re-save its prompts from a trusted session (torch.load(..., weights_only=False)) or retrain."
            )
        elif isinstance(error, OSError | EOFError) or "PytorchStreamReader" in reason:
            hint = " The file looks truncated or damaged (an interrupted copy or write?); write it again."
        else:
            hint = " It is not a file written by torch.save (a text file or another format?)."
        msg = f"Could not read {role.lower()} '{path}': {type(error).__name__}: {reason.rstrip('.')}.{hint}"
        raise ValueError(msg) from error


def _read(path: Path) -> dict[str, Any]:
    content = read_torch_file(path, "Prompt weights file")
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


def _learned_state(
    content: Mapping[str, Any], model: PromptedCLIP, method: str, source: str, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, bool]:
    """The learned state of a file of any supported format, the settings it records and whether it is trained."""
    if "prompt_learner" in content:
        _check_released_method(content["prompt_learner"], method, source)
        return model.convert_released_state_dict(content["prompt_learner"]), None, True
    if content.get("format") == FORMAT:
        if content["method"] != method:
            msg = f"{source} holds {content['method']} prompts; load it with {content['method']}, not {method}."
            raise ValueError(msg)
        # Version 1 recorded the hyper-parameters only and did not say whether the prompts were trained.
        recorded = content.get("prompt_settings") or hyper_parameter_settings(content.get("settings", {}), names)
        return content["state_dict"], recorded, bool(content.get("trained", True))
    if "state_dict" in content and any(key.startswith("model.") for key in content["state_dict"]):
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
        return state_dict, recorded, True if ready is None else bool(ready)
    msg = (
        f"{source} is not a prompt checkpoint: expected the released format {{'prompt_learner': ...}}, "
        "a file written by save_prompt_weights, or a Lightning checkpoint of one of the methods "
        f"({', '.join(METHODS)})."
    )
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
    source = f"'{path}'"
    state_dict, recorded, trained = _learned_state(_read(path), model, method, source, tuple(settings or ()))
    if not allow_setting_mismatch:
        check_settings(recorded, settings, source)
    check_finite(state_dict, source)
    model.load_prompt_state_dict(state_dict, source, trained=trained)
    return LoadedPrompts(trained=trained, settings=recorded)
