"""Heat-map figures whose panels are all titled and distinct, and notices for models with untrained weights.

Anomalib's ``ImageVisualizer`` draws its ``fields`` side by side, then each ``(base, overlays)`` of
``overlay_fields``; an overlay whose fields the item lacks (a predicted mask from a model without
post-processor, a ground truth when predicting on a folder) comes out as an untitled copy of its base.
:class:`HeatMapVisualizer` draws only what the item holds: Image, Gt Mask, Pred Mask (black and white,
so an empty prediction is visibly empty), then the image with the anomaly map over it, each titled, every title
ending inside its panel (:func:`fitting_font_size`).
Below the panels it names untrained weights (:func:`untrained_weights_notice`), so a figure from the
random small CLIP says so.

Example:
    >>> import torch
    >>> from anomalib.data import ImageItem
    >>> item = ImageItem(image=torch.rand(3, 64, 64), anomaly_map=torch.rand(64, 64))
    >>> visualizer = HeatMapVisualizer()
    >>> visualizer.panel_titles(item)
    ['Image', 'Image + Anomaly Map']
    >>> visualizer.visualize(item).size
    (512, 256)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.utils.path import convert_to_title_case, generate_output_filename
from anomalib.visualization.image import ImageVisualizer
from anomalib.visualization.image.functional import add_text_to_image, dynamic_font_size
from anomalib.visualization.image.item_visualizer import visualize_image_item
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from anomalib.data import ImageBatch, ImageItem, NumpyImageBatch, NumpyImageItem
    from lightning.pytorch import LightningModule, Trainer

#: Panels drawn on their own, in this order (those the item lacks are left out).
HEAT_MAP_FIELDS = ("image", "gt_mask", "pred_mask")

#: Panels drawn as overlays, after the fields.
HEAT_MAP_OVERLAYS = (("image", ("anomaly_map",)),)

#: Height in pixels of the strip that carries a notice below the panels.
NOTICE_HEIGHT = 28

#: Smallest font size a title is shrunk to so that it ends inside its panel.
MIN_TITLE_SIZE = 8


def fitting_font_size(titles: list[str], field_size: tuple[int, int], text_config: dict[str, Any]) -> int:
    """The font size at which every title, drawn as anomalib draws it, ends inside a panel of ``field_size``.

    anomalib sizes titles by the panel (:func:`~anomalib.visualization.image.functional.dynamic_font_size`, at
    least 20 px), so at its default 256 px "Image + Anomaly Map" runs past the panel's right edge and is cut. Here
    the size starts there and shrinks (not below :data:`MIN_TITLE_SIZE`) until the longest title's background
    box ends as far from the right edge as it starts from the left one. A ``size`` set in ``text_config`` is kept.

    Example:
        >>> fitting_font_size(["Image + Anomaly Map"], (256, 256), {})
        22
    """
    if text_config.get("size") is not None:
        return text_config["size"]
    position, padding = text_config.get("position", (10, 10)), text_config.get("padding", 3)
    font_file = text_config.get("font")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = dynamic_font_size(field_size)
    while size > MIN_TITLE_SIZE:
        try:
            font = ImageFont.truetype(font_file, size) if font_file else ImageFont.load_default(size=size)
        except OSError:  # as anomalib: a font that does not load falls back to the default one
            font = ImageFont.load_default(size=size)
        # the background box keeps the same margin to the right edge as to the left one
        if all(draw.textbbox(position, title, font=font)[2] + padding <= field_size[0] - (position[0] - padding)
               for title in titles):  # fmt: skip
            break
        size -= 1
    return size


#: CLIP weights files known to hold random, untrained weights, by their :func:`~anomalib_faprompt.prompt_weights.
#: clip_identity` (size and hash of the first and last MiB, so a copy or a renamed file is recognised and any other
#: weights are not): the small reference CLIPs of ``shared/golden`` (seeded random initialisations).
UNTRAINED_CLIP_WEIGHTS = {
    "20916199 bytes, sha256 of first and last MiB 3007fb2183dc662a": (
        "the random small CLIP of shared/golden (clip_small_seed0.pt)"
    ),
    "22608331 bytes, sha256 of first and last MiB 887ba60997c95eff": (
        "the random small CLIP of shared/golden (clip_small_promptad_seed1.pt)"
    ),
}


def untrained_weights_notice(model: Any) -> str | None:
    """What says that a model's frozen backbone has untrained (random) weights, ``None`` when nothing does.

    Detected from what the model reports, not from a path: for this package's methods the CLIP identity of
    their prompt settings (``pretrained=None``, or a weights file of :data:`UNTRAINED_CLIP_WEIGHTS`); for
    anomalib baselines ``pre_trained=False`` in their hyper-parameters. Weights trained elsewhere cannot be
    told from their values in general, so other files are not flagged.

    Example:
        >>> from anomalib.models import Patchcore
        >>> untrained_weights_notice(Patchcore(backbone="resnet18", pre_trained=False))
        'a backbone with random weights (pre_trained=False)'
    """
    prompt_settings = getattr(model, "prompt_settings", None)
    if callable(prompt_settings):
        weights = prompt_settings().get("clip_weights")
        if weights == "random initialisation (pretrained=None)":
            return "a CLIP with randomly initialised weights (pretrained=None)"
        return UNTRAINED_CLIP_WEIGHTS.get(weights)
    hparams = getattr(model, "hparams", None) or {}
    if hparams.get("pre_trained", True) is False:
        return "a backbone with random weights (pre_trained=False)"
    return None


class HeatMapVisualizer(ImageVisualizer):
    """Anomalib's image visualiser, drawing only the panels an item has, each titled, and a notice if any.

    Args:
        fields: Panels drawn on their own (default :data:`HEAT_MAP_FIELDS`).
        overlay_fields: Panels drawn as ``(base, overlays)`` (default :data:`HEAT_MAP_OVERLAYS`); one whose
            overlays the item lacks is left out rather than drawn as an untitled copy of its base.
        notice: Text of a strip below the panels. ``None`` (default): the notice of the model being tested or
            predicted with, :func:`untrained_weights_notice`, if any.
        **kwargs: ``ImageVisualizer``'s other arguments (``field_size``, ``fields_config``, ``text_config``, ...).

    Example:
        >>> from anomalib_faprompt import FAPrompt
        >>> isinstance(FAPrompt.configure_visualizer(), HeatMapVisualizer)
        True
    """

    def __init__(
        self,
        fields: list[str] | None = None,
        overlay_fields: list[tuple[str, list[str]]] | None = None,
        notice: str | None = None,
        **kwargs: Any,
    ) -> None:
        overlays = overlay_fields or [(base, list(over)) for base, over in HEAT_MAP_OVERLAYS]
        super().__init__(fields=fields or list(HEAT_MAP_FIELDS), overlay_fields=overlays, **kwargs)
        self.notice = notice

    def panels(self, item: ImageItem | NumpyImageItem) -> tuple[list[str], list[tuple[str, list[str]]]]:
        """The fields and overlays drawn for ``item``: those it holds, overlays only with something to overlay."""

        def present(field: str) -> bool:
            return getattr(item, field, None) is not None or (field == "image" and item.image_path is not None)

        fields = [field for field in dict.fromkeys(self.fields) if present(field)]
        overlays = []
        for base, over in self.overlay_fields:
            drawn = [field for field in over if present(field)]
            if present(base) and drawn:
                overlays.append((base, drawn))
        return fields, overlays

    def panel_titles(self, item: ImageItem | NumpyImageItem) -> list[str]:
        """The titles of the panels drawn for ``item``, left to right."""
        fields, overlays = self.panels(item)
        titles = [convert_to_title_case(field) for field in fields]
        titles += [f"{convert_to_title_case(base)} + {'+'.join(map(convert_to_title_case, over))}"
                   for base, over in overlays]  # fmt: skip
        return titles

    def draw(self, item: ImageItem | NumpyImageItem, notice: str | None = None) -> Image.Image | None:
        """The figure of one item: its panels side by side, ``notice`` (or :attr:`notice`) in a strip below."""
        fields, overlays = self.panels(item)
        if not fields and not overlays:
            return None
        text_config = dict(self.text_config)
        if text_config.get("enable", True):
            text_config["size"] = fitting_font_size(self.panel_titles(item), self.field_size, text_config)
        image = visualize_image_item(
            item,
            fields=fields,
            overlay_fields=overlays,
            field_size=self.field_size,
            fields_config=self.fields_config,
            overlay_fields_config=self.overlay_fields_config,
            text_config=text_config,
        )
        notice = self.notice if self.notice is not None else notice
        if image is None or not notice:
            return image
        strip = Image.new("RGB", (image.width, NOTICE_HEIGHT), (0, 0, 0))
        strip = add_text_to_image(strip, f"Untrained weights: {notice}", size=12, background=None, position=(6, 7))
        figure = Image.new("RGB", (image.width, image.height + NOTICE_HEIGHT))
        figure.paste(image, (0, 0))
        figure.paste(strip, (0, image.height))
        return figure

    def visualize(
        self,
        predictions: ImageItem | NumpyImageItem | ImageBatch | NumpyImageBatch,
    ) -> Image.Image | list[Image.Image | None] | None:
        """Draw one item, or each item of a batch (a list; a batch of one gives its image)."""
        from anomalib.data import ImageBatch, NumpyImageBatch

        if not isinstance(predictions, ImageBatch | NumpyImageBatch):
            return self.draw(predictions)
        drawn = [self.draw(item) for item in predictions]
        return drawn[0] if len(drawn) == 1 else drawn

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: ImageBatch,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save each item's figure under ``<default_root_dir>/images`` as anomalib's visualiser does."""
        del outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        notice = untrained_weights_notice(pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        for item in batch:
            image = self.draw(item, notice)
            if image is not None:
                filename = generate_output_filename(
                    input_path=item.image_path or "",
                    output_path=self.output_dir,
                    dataset_name=getattr(datamodule, "name", None),
                    category=getattr(datamodule, "category", None),
                )
                image.save(filename)
