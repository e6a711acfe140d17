"""Checks of the models' numeric settings, run at construction before any CLIP weights load.

Each check returns the value in its plain form or raises a ``ValueError`` that names the
setting, the valid range and the value given. The backbone's block counts and patch size come
from its open_clip config (:func:`backbone_geometry`), so even the checks that depend on the
backbone cost no model load.

Example:
    >>> from anomalib_faprompt.clip.settings import check_int, check_layers
    >>> check_int("n_ctx", 12, high=72)
    12
    >>> check_layers("feature_layers", None, depth=24)
    (24,)
    >>> check_int("n_ctx", 0, high=72)
    Traceback (most recent call last):
    ...
    ValueError: n_ctx must be an integer in 1..72, got 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _refuse(name: str, valid: str, value: Any, note: str = "") -> ValueError:
    return ValueError(f"{name} must be {valid}, got {value!r}{note}.")


def check_int(name: str, value: Any, low: int = 1, high: int | None = None, why: str = "") -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``low..high`` (no upper bound when ``None``).

    Args:
        name: Setting name for the message.
        value: Value given.
        low: Smallest valid value.
        high: Largest valid value, or ``None``.
        why: Where the range comes from, e.g. ``"the vision blocks of this backbone"``.
    """
    valid = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    valid += f" ({why})" if why else ""
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise _refuse(name, valid, value)
    return int(value)


def check_float(
    name: str, value: Any, low: float = 0.0, high: float | None = None, *, low_open: bool = False, why: str = ""
) -> float:
    """Return ``value`` as a ``float`` if it is finite, ``>= low`` (``> low`` if ``low_open``) and ``<= high``."""
    if high is None:
        valid = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        valid = f"a finite number in {low:g}..{high:g}"
    valid += f" ({why})" if why else ""
    if (
        not isinstance(value, Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < low
        or (low_open and value == low)
        or (high is not None and value > high)
    ):
        raise _refuse(name, valid, value)
    return float(value)


def check_layers(name: str, value: Any, depth: int) -> tuple[int, ...]:
    """Return 1-indexed blocks as a tuple; ``None`` means the last block.

    Args:
        name: Setting name for the message.
        value: ``None`` or a non-empty sequence of distinct integers in ``1..depth``.
        depth: Number of blocks of the backbone.
    """
    if value is None:
        return (depth,)
    valid = (
        f"None (the last block) or a non-empty list of distinct integers in 1..{depth} "
        "(the vision blocks of this backbone)"
    )
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or not value
        or not all(_is_int(layer) and 1 <= layer <= depth for layer in value)
        or len(set(value)) != len(value)
    ):
        raise _refuse(name, valid, value)
    return tuple(int(layer) for layer in value)


def check_betas(value: Any) -> tuple[float, float]:
    """Return Adam's betas as a tuple of two floats in [0, 1)."""
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(beta, Real) and not isinstance(beta, bool) and 0 <= beta < 1 for beta in value)
    ):
        raise _refuse("betas", "two numbers in [0, 1) (Adam's decay rates)", value)
    return float(value[0]), float(value[1])


def check_max_epochs(value: Any) -> int | None:
    """Return ``None`` or an epoch count >= 1; zero epochs would leave the prompts untrained."""
    if value is not None and (not _is_int(value) or value < 1):
        raise _refuse(
            "max_epochs",
            "None (the trainer's value) or an integer >= 1",
            value,
            ": with no epoch no prompt is learned; load trained prompts with prompt_weights=... instead",
        )
    return None if value is None else int(value)


def check_training(learning_rate: Any, betas: Any, max_epochs: Any) -> tuple[float, tuple[float, float], int | None]:
    """Check the optimiser and epoch settings shared by the Lightning modules."""
    return (
        check_float("learning_rate", learning_rate, low_open=True, why="Adam's step size"),
        check_betas(betas),
        check_max_epochs(max_epochs),
    )


@dataclass(frozen=True)
class BackboneGeometry:
    """What the settings depend on, read from the open_clip config (no weights).

    Attributes:
        vision_depth: Number of vision transformer blocks.
        patch_size: Side of a square patch in pixels.
        text_depth: Number of text transformer blocks.
        context_length: Number of text tokens, start and end tokens included.
    """

    vision_depth: int
    patch_size: int
    text_depth: int
    context_length: int

    def check_image_size(self, value: Any) -> int:
        """Return ``image_size`` if it is a positive multiple of the patch size."""
        value = check_int("image_size", value)
        if value % self.patch_size:
            raise _refuse("image_size", f"a multiple of the backbone's patch size {self.patch_size}", value)
        return value

    def check_vision_blocks(self, name: str, value: Any) -> int:
        """Return a number of vision blocks (or a block index) in ``1..vision_depth``."""
        return check_int(name, value, 1, self.vision_depth, "the vision blocks of this backbone")

    def check_context(self, name: str, value: Any, fixed_tokens: int, why: str = "") -> int:
        """Return a learnable context length that fits the text encoder beside ``fixed_tokens`` other tokens.

        The prompt is SOT, the learnable words, ``fixed_tokens`` template tokens and EOT; a longer one
        would be truncated by the tokenizer and the end token overwritten.
        """
        high = self.context_length - 2 - fixed_tokens
        why = f"{why}, " if why else ""
        return check_int(name, value, 1, high, f"{why}the prompt must fit CLIP's {self.context_length} text tokens")


def backbone_geometry(backbone: str | Path) -> BackboneGeometry:
    """Read block counts, patch size and context length of a CLIP ViT from its open_clip config.

    Raises:
        ValueError: If the backbone is unknown, or is not a CLIP ViT with CLIP's own text transformer
            (DPAM needs transformer blocks, a class token and a square patch).
    """
    from .loading import model_config

    config = model_config(backbone)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    values = (vision.get("layers"), vision.get("patch_size"), text.get("layers"), text.get("context_length", 77))
    if vision.get("timm_model_name") or text.get("hf_model_name") or not all(_is_int(v) for v in values):
        msg = (
            f"Backbone '{backbone}' is not a CLIP ViT with CLIP's own text transformer; DPAM and the prompted text "
            "encoder need one (e.g. 'ViT-L-14-336', 'ViT-B-16', or an open_clip JSON config of that kind)."
        )
        raise ValueError(msg)
    return BackboneGeometry(*values)
