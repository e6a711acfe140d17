"""Refuse image files anomalib would read wrongly, or fail on mid-run, before any work is done.

anomalib reads every image with PIL and ``.convert("RGB")`` (``anomalib.data.utils.read_image``) and
every mask with ``.convert("L")``, then resizes image and mask together to the model's input. Some
files pass through that silently wrong, or abort a run late with an error that names no file:

- a 16-bit (or 32-bit, or floating-point) greyscale image is clipped to 8 bits: mostly white;
- a truncated or damaged file raises ``OSError`` in a data-loader worker, naming no file;
- a mask with another aspect ratio than its image is stretched onto it;
- an anomalous image of a segmentation dataset without its mask file fails deep inside pandas or PIL.

:func:`validate_samples` checks a dataset's ``samples`` table from the file headers (PIL's
``Image.open`` reads only the header) and the files' last bytes (a complete PNG ends with its ``IEND``
chunk, a JPEG with its end-of-image marker); only files that do not end that way, and formats without
such a marker, are decoded in full. Each file is inspected once per process (cached by path, size and
modification time). 48-bit RGB PNGs are accepted: PIL reduces them to 8 bits per channel itself.
Masks may have another resolution than their image when the aspect ratio is the same (they stay
aligned after the joint resize).

Example:
    >>> import tempfile
    >>> from anomalib.data import MVTecAD
    >>> from anomalib_faprompt.data import generate_synthetic_dataset, validate_samples
    >>> root = generate_synthetic_dataset(tempfile.mkdtemp(), categories=["disc"], n_train=1, n_test=2)
    >>> datamodule = MVTecAD(root=root, category="disc", num_workers=0)
    >>> datamodule.setup()
    >>> validate_samples(datamodule.test_data.samples, "disc test split")  # raises DataValidationError if bad
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image

from .notices import warn_rotated, warn_skipped_files

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

logger = logging.getLogger(__name__)

# PIL modes that ``convert("RGB")`` clips to 8 bits instead of rescaling.
_WIDE_MODES = {
    "I;16": "16-bit greyscale",
    "I;16B": "16-bit greyscale",
    "I;16L": "16-bit greyscale",
    "I;16N": "16-bit greyscale",
    "I": "32-bit integer greyscale",
    "F": "32-bit floating-point greyscale",
}
#: The EXIF tag of an image's orientation.
EXIF_ORIENTATION = 0x0112
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_SHOWN_PROBLEMS = 10


class DataValidationError(ValueError):
    """Data anomalib would read wrongly or fail on; the message names each file and what to do."""


@dataclass(frozen=True)
class _FileInfo:
    size: tuple[int, int] | None = None
    mode: str | None = None
    problem: str | None = None
    #: EXIF orientation (1: as stored; 2-8: a viewer flips or rotates it, anomalib does not), if the file has one.
    orientation: int | None = None


def _ends_completely(path: Path, image_format: str | None) -> bool:
    """Whether the file ends with its format's end marker (``False`` when the format has none we check)."""
    if image_format not in {"PNG", "JPEG", "MPO"}:
        return False
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - 64))
        tail = file.read()
    if image_format == "PNG":
        return tail.endswith(_PNG_END)
    return tail.rstrip(b"\x00").endswith(_JPEG_END)


def _inspect(path: str) -> _FileInfo:
    """Size and mode from the header; the problem, if the file is missing, unreadable or incomplete."""
    file = Path(path)
    if not file.is_file():
        return _FileInfo(problem="does not exist")
    try:
        with Image.open(file) as image:
            size, mode = image.size, image.mode
            orientation = image.getexif().get(EXIF_ORIENTATION)
            if not _ends_completely(file, image.format):
                image.load()  # decodes in full; raises on truncated data
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as error:
        return _FileInfo(
            problem=f"is truncated or damaged (PIL: {error}); re-export or re-download it, or remove it from the data"
        )
    return _FileInfo(size=size, mode=mode, orientation=orientation)


_inspected: dict[tuple[str, int, int], _FileInfo] = {}


def _inspect_once(path: str) -> _FileInfo:
    try:
        stat = os.stat(path)
    except OSError:
        return _FileInfo(problem="does not exist")
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _inspected:
        _inspected[key] = _inspect(path)
    return _inspected[key]


def _same_aspect(image_size: tuple[int, int], mask_size: tuple[int, int]) -> bool:
    """Same aspect ratio up to rounding each side of a rescaled mask to whole pixels."""
    (image_width, image_height), (mask_width, mask_height) = image_size, mask_size
    return 2 * abs(mask_width * image_height - mask_height * image_width) <= image_width + image_height


def _text(value: Any) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _image_problem(path: str, info: _FileInfo) -> str | None:
    if info.problem:
        return f"{path} {info.problem}"
    if info.mode in _WIDE_MODES:
        return (
            f"{path} is a {_WIDE_MODES[info.mode]} image (PIL mode {info.mode}); anomalib reads images as 8-bit RGB "
            "and would clip it to white. Please convert it to 8-bit, scaling its range to 0-255 (for 16-bit: "
            "Image.fromarray((numpy.asarray(Image.open(path)) >> 8).astype('uint8')).save(path))"
        )
    return None


def _mask_problem(image_path: str, mask_path: str, image: _FileInfo, mask: _FileInfo) -> str | None:
    if mask.problem:
        return f"anomalous image {image_path}: its mask {mask_path} {mask.problem}"
    if image.size is not None and mask.size is not None and not _same_aspect(image.size, mask.size):
        return (
            f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image.size[0]}x{image.size[1]}: anomalib would stretch the mask onto the image. Give the mask its "
            "image's size"
        )
    return None


def refusal(problems: Sequence[str], description: str) -> DataValidationError:
    """The error for a list of problems (one per file) found in ``description``."""
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    if len(problems) == 1:
        return DataValidationError(f"Refusing {description}: {problems[0]}.")
    shown = "\n".join(f"  - {problem}" for problem in problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    return DataValidationError(f"Refusing {description}: {count} with its files:\n{shown}{more}")


def validate_samples(samples: pd.DataFrame, description: str) -> None:
    """Check every image (and every anomalous image's mask) of an anomalib ``samples`` table.

    Masks are required for anomalous images when the table is a segmentation one, i.e. when any
    anomalous image has a mask path; a table with no masks at all is a classification dataset.

    Args:
        samples: Table with an ``image_path`` column, and optionally ``mask_path`` and ``label_index``
            (1 for anomalous), as anomalib datasets hold it.
        description: What the table is, for the message (e.g. ``"target MVTecAD(category='bottle') test split"``).

    Raises:
        DataValidationError: Naming every file that is missing, truncated or damaged, a 16-bit/32-bit/float
            greyscale image, an anomalous image without its mask, or a mask whose aspect ratio is not its
            image's.
    """
    if "image_path" not in samples:
        return
    image_paths = [_text(path) for path in samples["image_path"]]
    mask_paths = [_text(path) for path in samples["mask_path"]] if "mask_path" in samples else [""] * len(samples)
    labels = samples["label_index"] if "label_index" in samples else pd.Series([None] * len(samples))
    anomalous = [bool(pd.notna(label) and int(label) == 1) for label in labels]
    segmentation = any(mask and flag for mask, flag in zip(mask_paths, anomalous, strict=True))

    problems = []
    for image_path, mask_path, is_anomalous in zip(image_paths, mask_paths, anomalous, strict=True):
        image = _inspect_once(image_path)
        problem = _image_problem(image_path, image)
        if problem is None and is_anomalous and segmentation:
            if mask_path:
                problem = _mask_problem(image_path, mask_path, image, _inspect_once(mask_path))
            else:
                problem = (
                    f"anomalous image {image_path} has no mask, while the other anomalous images have masks; add its "
                    "mask or remove the image"
                )
        if problem:
            problems.append(problem)
    if problems:
        raise refusal(problems, description)
    warn_rotated([path for path in image_paths if (_inspect_once(path).orientation or 1) != 1], description)


def find_unmasked_images(datamodule: Any) -> list[str]:
    """Anomalous images without a mask file in an MVTec-AD-layout or ``Folder`` datamodule, as messages.

    anomalib pairs images and masks by sorted order and fails in pandas when one is missing; this names
    the image and the mask path it expects instead.

    Args:
        datamodule: An anomalib datamodule; layouts other than MVTec AD's and ``Folder``'s give ``[]``.

    Returns:
        One message per anomalous image without a mask.
    """
    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if root is not None and category and (Path(root) / category / "ground_truth").is_dir():
        folder = Path(root) / category
        problems = []
        for defect in sorted(path for path in (folder / "test").glob("*") if path.is_dir() and path.name != "good"):
            mask_folder = folder / "ground_truth" / defect.name
            mask_stems = [path.stem for path in mask_folder.glob("*")] if mask_folder.is_dir() else []
            for image in sorted(path for path in defect.glob("*") if path.is_file()):
                if not any(image.stem in stem for stem in mask_stems):
                    expected = mask_folder / f"{image.stem}_mask.png"
                    problems.append(
                        f"anomalous image {image} has no mask: expected {expected}; add it or remove the image"
                    )
        return problems
    abnormal_dirs, mask_dirs = _folders(datamodule, "abnormal_dir"), _folders(datamodule, "mask_dir")
    if not abnormal_dirs or not mask_dirs:
        return []
    mask_stems = [path.stem for folder in mask_dirs for path in folder.glob("*")]
    return [
        f"anomalous image {image} has no mask: expected a file named like {image.stem}{image.suffix} in "
        f"{' or '.join(str(folder) for folder in mask_dirs)}; add it or remove the image"
        for folder in abnormal_dirs
        for image in sorted(path for path in folder.glob("*") if path.is_file())
        if not any(image.stem in stem for stem in mask_stems)
    ]


def _folders(datamodule: Any, attribute: str) -> list[Path]:
    value = getattr(datamodule, attribute, None)
    if not value:
        return []
    values = [value] if isinstance(value, str | Path) else list(value)
    root = getattr(datamodule, "root", None)
    return [
        Path(root) / folder if root is not None and not Path(folder).is_absolute() else Path(folder)
        for folder in values
    ]


def _iter_dataloaders(loaders: Any) -> Iterator[Any]:
    if loaders is None:
        return
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from _iter_dataloaders(loader)
    else:
        yield loaders


def _samples_of(dataset: Any) -> pd.DataFrame | None:
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, pd.DataFrame):
        return samples
    filenames = getattr(dataset, "image_filenames", None)  # anomalib's PredictDataset (a folder of images)
    if filenames is not None:
        return pd.DataFrame({"image_path": [str(path) for path in filenames]})
    indices, inner = getattr(dataset, "indices", None), getattr(dataset, "dataset", None)  # torch Subset
    if indices is not None and inner is not None and (inner_samples := _samples_of(inner)) is not None:
        return inner_samples.iloc[list(indices)]
    return None


def _name(dataset: Any) -> str:
    category = getattr(dataset, "category", None)
    return f"{type(dataset).__name__}(category={category!r})" if category else type(dataset).__name__


def check_masks_before_setup(datamodule: Any) -> None:
    """Refuse anomalous images without masks before anomalib's datamodule setup fails on them in pandas.

    Lightning prepares data (``prepare_data`` of the datamodule, then of the model) before it sets the datamodule
    up, so the model's ``prepare_data`` calls this where a missing mask can still be named.

    Raises:
        DataValidationError: Naming each anomalous image without a mask and the mask path anomalib expects.
    """
    problems = find_unmasked_images(datamodule) if datamodule is not None else []
    if problems:
        category = getattr(datamodule, "category", None)
        raise refusal(problems, f"data {type(datamodule).__name__}(category={category!r})")
    for part in [*getattr(datamodule, "auxiliary", ()), getattr(datamodule, "target", datamodule)]:
        warn_skipped_files(part)


def validate_trainer_data(trainer: Trainer | None, stage: str) -> None:
    """Validate the data a Lightning stage is about to read (the model's ``on_<stage>_start`` hooks call this).

    ``fit`` checks the datamodule's train and validation datasets (the loaders are not built yet);
    ``validate``, ``test`` and ``predict`` check the datasets of the stage's data loaders, including a
    predict folder without labels. Datasets without an anomalib ``samples`` table or file list are skipped.

    Args:
        trainer: The model's trainer (``None`` skips).
        stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

    Raises:
        DataValidationError: See :func:`validate_samples`.
    """
    if trainer is None:
        return
    if stage == "fit":
        datamodule = getattr(trainer, "datamodule", None)
        datasets = [getattr(datamodule, name, None) for name in ("train_data", "val_data")]
    else:
        loaders = getattr(trainer, f"{'val' if stage == 'validate' else stage}_dataloaders", None)
        datasets = [getattr(loader, "dataset", None) for loader in _iter_dataloaders(loaders)]
    for dataset in datasets:
        samples = _samples_of(dataset) if dataset is not None else None
        if samples is not None:
            validate_samples(samples, f"{stage} data ({_name(dataset)})")
