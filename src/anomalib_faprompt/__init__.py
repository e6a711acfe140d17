"""anomalib-faprompt: AnomalyCLIP and FAPrompt zero-shot anomaly detection for anomalib.

Importing the package registers the models with anomalib (``get_model("FAPrompt")``, the CLI's
``--model FAPrompt``); after ``pip install`` this also happens automatically the first time a
program imports ``anomalib.models``.

Example:
    >>> from anomalib.models import get_model
    >>> import anomalib_faprompt
    >>> get_model("FAPrompt", backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10).name
    'FAPrompt'
"""

import sys

from .models import AnomalyCLIP, FAPrompt
from .registration import register, register_pipelines

register()
if "anomalib.cli.pipelines" in sys.modules:
    register_pipelines()

__all__ = ["AnomalyCLIP", "FAPrompt", "register"]
__version__ = "0.1.0"
