"""anomalib-faprompt: CLIP prompt methods for anomalib, AnomalyCLIP and FAPrompt (zero-shot) and PromptAD (few-shot).

Importing the package registers the models with anomalib (``get_model("FAPrompt")``, the CLI's
``--model FAPrompt``); after ``pip install`` this also happens automatically the first time a
program imports ``anomalib.models``. The methods are listed in :mod:`anomalib_faprompt.methods`;
each is importable from here by its short name.

Example:
    >>> from anomalib.models import get_model
    >>> import anomalib_faprompt
    >>> get_model("FAPrompt", backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10).name
    'FAPrompt'
"""

from typing import Any

from .methods import METHODS
from .registration import register, register_pipelines

register()
register_pipelines()  # when anomalib.cli.pipelines has loaded; otherwise the start-up hook does it then

__all__ = [*METHODS, "NormalFPRPostProcessor", "register"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in METHODS:
        return METHODS[name].load()
    if name == "NormalFPRPostProcessor":  # on first use: anomalib.models imports this package while it loads
        from .post_processing import NormalFPRPostProcessor

        return NormalFPRPostProcessor
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
