"""Make the models resolvable by anomalib's short names.

``anomalib.models.get_model("FAPrompt")`` looks among ``AnomalibModule``'s direct subclasses,
``get_model({"class_path": "FAPrompt"})`` and the CLI look the name up on ``anomalib.models``.
"""

from __future__ import annotations


def register() -> None:
    """Expose AnomalyCLIP and FAPrompt on ``anomalib.models`` (idempotent)."""
    import anomalib.models as anomalib_models

    from .models import AnomalyCLIP, FAPrompt

    for model_class in (AnomalyCLIP, FAPrompt):
        setattr(anomalib_models, model_class.__name__, model_class)
        if model_class.__name__ not in anomalib_models.__all__:
            anomalib_models.__all__.append(model_class.__name__)
