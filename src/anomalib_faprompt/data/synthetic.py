"""Procedural anomaly-detection categories written in MVTec AD layout.

Each category is a texture or an object family with per-image variation; anomalous images carry
one of several defect types (scratch, spot, crack, stain) with a pixel mask. The folder reads with
anomalib's ``MVTecAD`` (or ``Folder``) datamodule, offline; :class:`SyntheticAD` is that datamodule
under its own name, writing a category on first use as anomalib's datamodules download theirs.

Example:
    >>> import tempfile
    >>> from anomalib.data import MVTecAD
    >>> from anomalib_faprompt.data import generate_synthetic_dataset
    >>> root = generate_synthetic_dataset(tempfile.mkdtemp(), categories=["stripes"], n_train=2, n_test=2)
    >>> datamodule = MVTecAD(root=root, category="stripes", num_workers=0)
    >>> datamodule.setup()
    >>> len(datamodule.test_data)
    4
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from anomalib.data import MVTecAD
from PIL import Image, ImageDraw, ImageFilter

Generator = np.random.Generator


def _stripes(rng: Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 14)
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    colour = np.array([90, 120, 170]) + rng.normal(0, 8, 3)
    return colour + 35 * wave[..., None]


def _checker(rng: Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    cell = int(rng.integers(10, 18))
    board = ((x + rng.integers(cell)) // cell + (y + rng.integers(cell)) // cell) % 2
    return np.where(board[..., None] == 1, [200, 190, 160], [120, 100, 80]) + rng.normal(0, 6, (size, size, 3))


def _grain(rng: Generator, size: int) -> np.ndarray:
    noise = Image.fromarray(rng.normal(128, 40, (size, size)).clip(0, 255).astype("uint8"))
    smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(2.0)), dtype=float)
    return np.stack([smooth * 0.8 + 40, smooth * 0.6 + 50, smooth * 0.4 + 30], axis=-1)


def _object(shape: str) -> Callable[[Generator, int], np.ndarray]:
    def draw(rng: Generator, size: int) -> np.ndarray:
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(25, 50, 3)))
        canvas = ImageDraw.Draw(image)
        centre = size / 2 + rng.normal(0, size / 40, 2)
        radius = size * rng.uniform(0.3, 0.36)
        box = (*(centre - radius), *(centre + radius))
        fill = (180, 175, 165) if shape == "disc" else (150, 170, 190)
        (canvas.ellipse if shape == "disc" else canvas.rectangle)(box, fill=fill)
        return np.asarray(image, dtype=float) + rng.normal(0, 4, (size, size, 3))

    return draw


CATEGORIES: dict[str, Callable[[Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "checker": _checker,
    "grain": _grain,
    "disc": _object("disc"),
    "plate": _object("plate"),
}
DEFECTS = ("scratch", "spot", "crack", "stain")


def _defect(rng: Generator, size: int, kind: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """Return a defect mask (mode L) and its colour."""
    mask = Image.new("L", (size, size), 0)
    canvas = ImageDraw.Draw(mask)
    low, high = int(size * 0.3), int(size * 0.7)
    x, y = rng.integers(low, high, 2)
    if kind == "scratch":
        dx, dy = rng.normal(0, size / 5, 2)
        canvas.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=max(2, size // 40))
        colour = (245, 245, 240)
    elif kind == "spot":
        radius = size * rng.uniform(0.05, 0.09)
        canvas.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        colour = (20, 20, 20)
    elif kind == "crack":
        points = [(float(x), float(y))]
        for _ in range(12):
            points.append((points[-1][0] + rng.normal(0, size / 25), points[-1][1] + rng.normal(0, size / 25)))
        canvas.line(points, fill=255, width=max(2, size // 50))
        colour = (10, 10, 10)
    else:
        radius = size * rng.uniform(0.08, 0.12)
        canvas.ellipse((x - radius, y - radius * 0.7, x + radius, y + radius * 0.7), fill=255)
        colour = (200, 60, 40)
    return mask, colour


def generate_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] | None = None,
    n_train: int = 8,
    n_test: int = 6,
    image_size: int = 128,
    defects: Sequence[str] = DEFECTS,
    seed: int = 0,
) -> Path:
    """Write categories in MVTec AD layout: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}``.

    Args:
        root: Destination folder.
        categories: Names from :data:`CATEGORIES` (all by default).
        n_train: Normal training images per category.
        n_test: Normal test images per category, and anomalous test images per category (spread over defects).
        image_size: Side of the square images.
        defects: Defect types to draw.
        seed: Seed; the same arguments give the same images.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: For an unknown category or defect.
    """
    root = Path(root)
    categories = list(categories or CATEGORIES)
    unknown = sorted(set(categories) - set(CATEGORIES)) + sorted(set(defects) - set(DEFECTS))
    if unknown:
        msg = f"Unknown synthetic categories/defects {unknown}; categories: {sorted(CATEGORIES)}, defects: {DEFECTS}."
        raise ValueError(msg)
    for category in categories:
        # Seeded by the category's place in CATEGORIES, not in ``categories``: a category is the same images
        # whether it is generated alone or with others.
        rng = np.random.default_rng([seed, list(CATEGORIES).index(category)])
        draw = CATEGORIES[category]
        folder = root / category

        def save(array: np.ndarray, path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(array, 0, 255).astype("uint8")).save(path)

        for number in range(n_train):
            save(draw(rng, image_size), folder / "train" / "good" / f"{number:03d}.png")
        for number in range(n_test):
            save(draw(rng, image_size), folder / "test" / "good" / f"{number:03d}.png")
            kind = defects[number % len(defects)]
            image = draw(rng, image_size)
            mask, colour = _defect(rng, image_size, kind)
            weight = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.8)), dtype=float)[..., None] / 255
            save(image * (1 - weight) + np.array(colour) * weight, folder / "test" / kind / f"{number:03d}.png")
            save(np.asarray(mask, dtype=float), folder / "ground_truth" / kind / f"{number:03d}_mask.png")
    return root


class SyntheticAD(MVTecAD):
    """The synthetic categories as an anomalib datamodule, written on first use.

    An ``MVTecAD`` datamodule whose ``prepare_data`` generates the category (instead of downloading it) when
    ``<root>/<category>`` does not exist, and whose name, ``SyntheticAD``, is what result tables, folders and
    logs show. The generation settings are kept in ``<root>/<category>/synthetic.json``; a folder written
    with other settings is refused rather than silently reused.

    Args:
        root: Folder holding the categories.
        category: One of :data:`CATEGORIES`.
        n_train: Normal training images generated for the category.
        n_test: Normal and anomalous test images generated for the category (each).
        image_size: Side of the generated images.
        generation_seed: Seed of the generated images (``seed`` is anomalib's split seed).
        **kwargs: ``MVTecAD``'s other arguments (batch sizes, workers, split modes, augmentations, ``seed``).

    Example:
        >>> import tempfile
        >>> from anomalib_faprompt.data import SyntheticAD
        >>> datamodule = SyntheticAD(root=tempfile.mkdtemp(), category="disc", n_train=2, n_test=2, num_workers=0)
        >>> datamodule.prepare_data()
        >>> datamodule.setup()
        >>> datamodule.name, len(datamodule.train_data), len(datamodule.test_data)
        ('SyntheticAD', 2, 4)
    """

    #: The categories it can write: what ``categories: all`` means for it in a ``zero_shot`` config.
    categories_available: ClassVar[tuple[str, ...]] = tuple(CATEGORIES)
    #: Its ``prepare_data`` writes a missing category (the ``zero_shot`` pipeline calls it before looking for it).
    writes_categories: ClassVar[bool] = True

    def __init__(
        self,
        root: Path | str = "./datasets/synthetic",
        category: str = "disc",
        n_train: int = 8,
        n_test: int = 6,
        image_size: int = 128,
        generation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if category not in CATEGORIES:
            msg = f"SyntheticAD: unknown category {category!r}; the synthetic categories are {sorted(CATEGORIES)}."
            raise ValueError(msg)
        for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("image_size", image_size, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                msg = f"SyntheticAD: {name} must be an integer >= {low}, got {value!r}."
                raise ValueError(msg)
        super().__init__(root=root, category=category, **kwargs)
        self.generation = {"n_train": n_train, "n_test": n_test, "image_size": image_size, "seed": generation_seed}

    def prepare_data(self) -> None:
        """Generate the category unless it exists; refuse one generated with other settings."""
        folder = self.root / self.category
        record = folder / "synthetic.json"
        if folder.is_dir():
            written = json.loads(record.read_text()) if record.is_file() else None
            if written is not None and written != self.generation:
                differing = ", ".join(
                    f"{key}={self.generation[key]} (on disk: {key}={written.get(key)})"
                    for key in self.generation
                    if written.get(key) != self.generation[key]
                )
                msg = (
                    f"SyntheticAD: {folder} was generated with other settings: {differing}. "
                    "Use another root, delete the folder, or pass the settings it was generated with."
                )
                raise ValueError(msg)
            return
        # Generated beside the destination and moved into place in one step, so an interrupted run never leaves a
        # half-written category that a later run would take as complete.
        staging = self.root / f".{self.category}.generating-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        generate_synthetic_dataset(
            staging,
            categories=[self.category],
            n_train=self.generation["n_train"],
            n_test=self.generation["n_test"],
            image_size=self.generation["image_size"],
            seed=self.generation["seed"],
        )
        (staging / self.category / "synthetic.json").write_text(json.dumps(self.generation))
        os.replace(staging / self.category, folder)
        staging.rmdir()
