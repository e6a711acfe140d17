"""Read and write learned prompts.

Three formats load:

- the project's own small file (``save_prompt_weights``): learned parameters plus the method
  and settings they were trained with;
- the authors' released checkpoints, ``{"prompt_learner": state_dict}`` (SPEC §3);
- a Lightning checkpoint of AnomalyCLIP or FAPrompt (its learned parameters are taken).

Example:
    >>> from anomalib_faprompt.prompt_weights import load_prompt_weights  # doctest: +SKIP
    >>> load_prompt_weights(model.model, "AnomalyCLIP_mvtec.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from anomalib_faprompt.clip.prompted_clip import PromptedCLIP

FORMAT = "anomalib_faprompt.prompts"


def _plain(value: Any) -> Any:
    """Settings as plain Python (OmegaConf containers, tuples and paths do not load with weights_only)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_plain(item) for item in value]
    return str(value)


def save_prompt_weights(model: PromptedCLIP, path: str | Path, method: str, settings: dict[str, Any]) -> Path:
    """Write the learned parameters of ``model`` to a small standalone file.

    Args:
        model: The torch model.
        path: Destination file.
        method: Method name (``"AnomalyCLIP"`` or ``"FAPrompt"``), checked at load time.
        settings: The settings the prompts were trained with (shown when they do not fit).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain_settings = {key: _plain(value) for key, value in settings.items()}
    torch.save(
        {
            "format": FORMAT,
            "version": 1,
            "method": method,
            "settings": plain_settings,
            "state_dict": model.prompt_state_dict(),
        },
        path,
    )
    return path


def _read(path: Path) -> dict[str, Any]:
    from anomalib.utils.serialization import anomalib_safe_globals

    try:
        with anomalib_safe_globals():
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        msg = f"Could not read prompt weights from '{path}': {error}"
        raise ValueError(msg) from error
    if not isinstance(content, dict):
        msg = f"'{path}' holds a {type(content).__name__}, not prompt weights."
        raise ValueError(msg)
    return content


def load_prompt_weights(model: PromptedCLIP, path: str | Path, method: str) -> None:
    """Load learned prompts from any supported format into ``model``.

    Args:
        model: The torch model to load into.
        path: Prompt file, released checkpoint or Lightning checkpoint.
        method: The method ``model`` implements, to refuse another method's prompts clearly.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a prompt checkpoint of ``method`` with fitting settings.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Prompt weights file '{path}' does not exist (prompt_weights=...)."
        raise FileNotFoundError(msg)
    content = _read(path)
    source = f"'{path}'"
    if "prompt_learner" in content:
        state_dict = model.convert_released_state_dict(content["prompt_learner"])
    elif content.get("format") == FORMAT:
        if content["method"] != method:
            msg = f"{source} holds {content['method']} prompts; load it with {content['method']}, not {method}."
            raise ValueError(msg)
        state_dict = content["state_dict"]
        source += f" (trained with {content['settings']})"
    elif "state_dict" in content and any(key.startswith("model.") for key in content["state_dict"]):
        has_prior = any(key.startswith("model.prior.") for key in content["state_dict"])
        lightning_method = "FAPrompt" if has_prior else "AnomalyCLIP"
        if lightning_method != method:
            msg = f"{source} is a {lightning_method} checkpoint; load it with {lightning_method}, not {method}."
            raise ValueError(msg)
        learned = ("deep_prompts.", "prior.", "normal_context", "abnormal_context")
        state_dict = {
            key.removeprefix("model."): value
            for key, value in content["state_dict"].items()
            if key.removeprefix("model.").startswith(learned)
        }
    else:
        msg = (
            f"{source} is not a prompt checkpoint: expected the released format {{'prompt_learner': ...}}, "
            f"a file written by save_prompt_weights, or an AnomalyCLIP/FAPrompt Lightning checkpoint."
        )
        raise ValueError(msg)
    model.load_prompt_state_dict(state_dict, source)
