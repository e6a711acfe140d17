"""The methods, each in anomalib's model layout: one package per method, listed in :mod:`anomalib_faprompt.methods`.

Each method's Lightning class is importable from here by its short name (imported on first use).

Example:
    >>> from anomalib_faprompt.models import FAPrompt
    >>> FAPrompt.method_name
    'FAPrompt'
"""

from __future__ import annotations

from typing import Any

from anomalib_faprompt.methods import METHODS

__all__ = list(METHODS)


def __getattr__(name: str) -> Any:
    if name in METHODS:
        return METHODS[name].load()
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
