"""Notices about data that anomalib reads without an error but not as its owner expects.

None of these is refused (each can be intended), and each is named once per process with what to do:

- images with an EXIF orientation: a viewer rotates or flips them, anomalib's reader does not, so masks drawn on
  the rotated view do not match what the model sees (:func:`warn_rotated`);
- image files anomalib's ``MVTecAD`` leaves out of the splits without a word: other formats than ``.png``, links
  to files outside the category folder (:func:`skipped_image_files`);
- anomalous training images whose masks are all zero, from which prompt learning's pixel losses learn "no anomaly
  anywhere" (:func:`empty_mask_warning`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

logger = logging.getLogger(__name__)

#: Files named in a notice; the rest are counted.
_SHOWN = 10


def _text(value: Any) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


#: Images already named in a notice about their EXIF orientation (once per process).
_rotation_noticed: set[str] = set()


def warn_rotated(paths: Sequence[str], description: str) -> None:
    """Name images whose EXIF orientation a viewer applies and anomalib's reader does not (once per file)."""
    new = [path for path in paths if path not in _rotation_noticed]
    if not new:
        return
    _rotation_noticed.update(new)
    more = len(new) - _SHOWN
    shown = ", ".join(new[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
    logger.warning(
        "%d image(s) of %s carry an EXIF orientation (a viewer rotates or flips them), which anomalib's image reader "
        "ignores: the model sees them as stored, and masks drawn on the rotated view do not match them: %s. Save "
        "them rotated (PIL.ImageOps.exif_transpose) if their masks were drawn that way.",
        len(new),
        description,
        shown,
    )


#: Share of anomalous training images with an all-zero mask above which prompt learning warns (a broken mask folder).
EMPTY_MASK_SHARE = 0.05


def _mask_is_empty(path: str) -> bool:
    """Whether a mask file has no non-zero pixel (decoded once per process; cached by path, size and time)."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _empty_masks:
        with Image.open(path) as mask:
            _empty_masks[key] = mask.getbbox() is None
    return _empty_masks[key]


_empty_masks: dict[tuple[str, int, int], bool] = {}


def empty_mask_warning(samples: pd.DataFrame, description: str) -> str | None:
    """A warning when more than :data:`EMPTY_MASK_SHARE` of the anomalous images' masks are all zero, else ``None``.

    Learning from masks (the pixel losses) on such images teaches "no anomaly anywhere" on an anomalous image: a
    mask folder of empty files (a broken export, masks saved at 0/1 on a 0-255 scale and then thresholded) trains
    without an error. The warning names the count and each folder that holds empty masks.

    Args:
        samples: A ``samples`` table with ``label_index`` and ``mask_path`` (the training split).
        description: What the table is, for the message.
    """
    if "mask_path" not in samples or "label_index" not in samples:
        return None
    masks = [_text(path) for path, label in zip(samples["mask_path"], samples["label_index"], strict=True)
             if pd.notna(label) and int(label) == 1]  # fmt: skip
    masks = [path for path in masks if path and Path(path).is_file()]
    empty = [path for path in masks if _mask_is_empty(path)]
    if not masks or len(empty) <= EMPTY_MASK_SHARE * len(masks):
        return None
    folders = pd.Series([str(Path(path).parent) for path in empty]).value_counts(sort=False)
    totals = pd.Series([str(Path(path).parent) for path in masks]).value_counts(sort=False)
    shown = "; ".join(f"{folder} ({count} of {totals[folder]})" for folder, count in folders.items())
    return (
        f"{len(empty)} of the {len(masks)} anomalous images of {description} have an all-zero mask, so prompt "
        f"learning's pixel losses learn 'no anomaly anywhere' on them: {shown}. Check these mask folders (a broken "
        "export, or masks saved as 0/1 where 0/255 is expected)."
    )


#: Category folders already named in a notice about files anomalib skips (once per process).
_skips_noticed: set[Path] = set()


def skipped_image_files(datamodule: Any) -> list[str]:
    """Image files of an ``MVTecAD`` category that its dataset does not read, as messages.

    anomalib's ``MVTecAD`` lists only ``.png`` files, and only those inside the category folder: a ``.jpg`` copy
    or a link to a file elsewhere is silently left out of the splits.
    """
    from anomalib.data import MVTecAD
    from anomalib.data.datasets.image.mvtecad import IMG_EXTENSIONS

    if not isinstance(datamodule, MVTecAD) or not getattr(datamodule, "category", None):
        return []
    folder = Path(datamodule.root) / datamodule.category
    if not folder.is_dir():
        return []
    inside = folder.resolve()
    image_suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    skipped = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in image_suffixes and path.suffix not in IMG_EXTENSIONS and path.is_file():
            skipped.append(f"{path} ({path.suffix} files are not read)")
        elif path.suffix in IMG_EXTENSIONS and path.is_symlink() and inside not in path.resolve().parents:
            skipped.append(f"{path} (a link to {path.resolve()}, outside the category folder)")
    return skipped


def warn_skipped_files(datamodule: Any) -> None:
    """Name the image files of a category that its datamodule leaves out (:func:`skipped_image_files`), once."""
    skipped = skipped_image_files(datamodule)
    folder = Path(getattr(datamodule, "root", ".")) / str(getattr(datamodule, "category", ""))
    if not skipped or folder in _skips_noticed:
        return
    _skips_noticed.add(folder)
    more = len(skipped) - _SHOWN
    logger.warning(
        "%d image file(s) under %s are not in the data: anomalib's %s reads only .png files inside the category "
        "folder. %s. Convert them to PNG or copy the linked files in (or use anomalib's Folder datamodule).",
        len(skipped),
        folder,
        type(datamodule).__name__,
        "; ".join(skipped[:_SHOWN]) + (f"; and {more} more" if more > 0 else ""),
    )
