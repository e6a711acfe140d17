"""What prompts depend on: the CLIP they were learned on and the model's shape settings, and their comparison.

A prompt file and a Lightning checkpoint record these settings (:func:`clip_identity` plus each method's
``prompt_setting_names``); loading them into a model with other values is refused with :class:`SettingsMismatchError`
naming each setting, unless the model is built with ``allow_setting_mismatch=True``.

Example:
    >>> settings_mismatches({"image_size": 336, "text_depth": 9}, {"image_size": 518, "text_depth": 9})
    ['image_size is 336 there and 518 here']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

#: Bytes hashed at each end of a CLIP weights file to identify it (whole file when smaller than twice this).
IDENTITY_CHUNK = 1 << 20

#: Setting keys that only describe another key for messages; never compared.
_DESCRIPTIONS = {"clip_architecture": "clip_architecture_source", "clip_weights": "clip_weights_source"}

_MISMATCH_ADVICE = (
    "Construct the model with the settings the prompts were learned with, or pass allow_setting_mismatch=True "
    "(CLI: --model.allow_setting_mismatch true) to load them anyway."
)


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


def displayable(value: Any) -> Any:
    """Settings as plain Python for the informational record of a prompt file; unknown objects as text."""
    value = plain_data(value)
    if isinstance(value, dict):
        return {str(key): displayable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [displayable(item) for item in value]
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


def hyper_parameter_settings(hyper_parameters: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The compared settings found in a model's hyper-parameters (no CLIP identity: paths are not weights)."""
    return {name: plain_data(hyper_parameters[name]) for name in names if name in hyper_parameters}
