"""The models' pre-processing: CLIP's resize and normalisation, the same in the engine and in exported graphs.

anomalib's ``PreProcessor`` applies its ``transform`` in the engine's loops and an ``export_transform`` inside
exported graphs, made by dropping the antialiasing of every ``Resize`` (``get_exportable_transform``). For an image
not already at the model's size the two then feed the model other pixels, and an exported model's scores differ
from ``anomalib predict``'s (by up to 0.03 on full-size images). :class:`ClipPreProcessor` exports the antialiased
bicubic resize itself (:class:`~anomalib_faprompt.components.resize.AntialiasedBicubicResize`), so both paths
compute one resize, to float rounding, whatever the input size.

Example:
    >>> pre_processor = clip_pre_processor(224)
    >>> pre_processor.export_transform.transforms[0]
    AntialiasedBicubicResize(size=(224, 224))
"""

from __future__ import annotations

from typing import Any

from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

from .resize import AntialiasedBicubicResize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def exportable_transform(transform: Transform | None) -> Any:
    """``transform`` for export: antialiased bicubic resizes exported as they run, the rest as anomalib exports it.

    A ``Resize`` to a (height, width) pair with bicubic interpolation and antialiasing becomes
    :class:`AntialiasedBicubicResize`; every other transform goes through anomalib's ``get_exportable_transform``.
    """
    if isinstance(transform, Compose):
        return Compose([exportable_transform(step) for step in transform.transforms])
    size = getattr(transform, "size", None)
    if (
        isinstance(transform, Resize)
        and transform.antialias
        and transform.interpolation == InterpolationMode.BICUBIC
        and isinstance(size, list | tuple)
        and len(size) == 2
    ):
        return AntialiasedBicubicResize((size[0], size[1]))
    return get_exportable_transform(transform)


class ClipPreProcessor(PreProcessor):
    """anomalib's ``PreProcessor`` whose exported resize antialiases as its ``transform`` does (module docstring)."""

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        self.export_transform = exportable_transform(self.transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the transform from a checkpoint, and its exportable form."""
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)


def clip_pre_processor(image_size: int | tuple[int, int] | None = None) -> ClipPreProcessor:
    """Resize (bicubic, antialiased) to ``image_size`` (518 when ``None``) and normalise with CLIP's mean and std.

    Masks are resized alongside the images by anomalib's pre-processor (nearest neighbour).
    """
    image_size = image_size or 518
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    transform = Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]
    )
    return ClipPreProcessor(transform=transform)
