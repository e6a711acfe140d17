"""Shared fixtures: the authors' golden outputs and the small CLIP in ``../shared/golden``.

Tests that need the fixtures fail (not skip) when ``REQUIRE_GOLDEN=1``, as in CI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker computes on its share of the cores (subprocesses it starts too).

    Torch's threads spin while they wait: two workers that each take every core run slower than one.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


SHARED = Path(os.environ.get("ANOMALIB_FAPROMPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"


def golden_path(name: str) -> Path:
    """Path of a golden file; skips, or fails under REQUIRE_GOLDEN=1, when it is absent."""
    path = GOLDEN / name
    if not path.is_file():
        message = f"golden fixture {path} is missing (set ANOMALIB_FAPROMPT_SHARED to the shared/ folder)"
        if os.environ.get("REQUIRE_GOLDEN") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def small_clip() -> dict[str, Any]:
    """Constructor settings of the small random CLIP the fixtures were made with."""
    return {
        "backbone": str(golden_path("clip_small.json")),
        "pretrained": str(golden_path("clip_small_seed0.pt")),
        "image_size": 224,
        "dpam_layers": 6,
    }


@pytest.fixture(scope="session")
def small_promptad() -> dict[str, Any]:
    """Constructor settings of PromptAD on the small random CLIP of its fixture (ViT-B-16-plus-240's layout)."""
    return {
        "backbone": str(golden_path("clip_small_promptad.json")),
        "pretrained": str(golden_path("clip_small_promptad_seed1.pt")),
        "image_size": 240,
        "category": "metal_nut",
    }


@pytest.fixture(scope="session")
def method_settings(small_clip, small_promptad) -> dict[str, dict[str, Any]]:
    """Per built-in method, constructor settings of a small random CLIP (tests parametrised over the methods)."""
    from anomalib_faprompt.methods import BUILT_IN_METHODS

    settings = {"AnomalyCLIP": small_clip, "FAPrompt": small_clip, "PromptAD": small_promptad}
    missing = set(BUILT_IN_METHODS) - set(settings)
    assert not missing, f"give the small CLIP settings of {missing} here"
    return settings


@pytest.fixture(scope="session")
def anomalyclip_golden() -> dict[str, Any]:
    return torch.load(golden_path("anomalyclip_seed0.pt"), weights_only=True)


@pytest.fixture(scope="session")
def faprompt_golden() -> dict[str, Any]:
    return torch.load(golden_path("faprompt_seed0.pt"), weights_only=True)


@pytest.fixture(scope="session")
def promptad_golden() -> dict[str, Any]:
    return torch.load(golden_path("promptad_seed1.pt"), weights_only=True)


@pytest.fixture(scope="session")
def released_prompts(tmp_path_factory: pytest.TempPathFactory, anomalyclip_golden, faprompt_golden) -> dict[str, Path]:
    """The fixtures' prompt checkpoints written as the released files (``{"prompt_learner": ...}``)."""
    folder = tmp_path_factory.mktemp("released")
    paths = {}
    for method, golden in (("AnomalyCLIP", anomalyclip_golden), ("FAPrompt", faprompt_golden)):
        paths[method] = folder / f"{method}_released.pth"
        torch.save(golden["prompt_checkpoint"], paths[method])
    return paths


def write_tiny_mvtec(root: Path, category: str = "widget", size: int = 64, seed: int = 0) -> Path:
    """Write a minimal category in MVTec AD layout: textured images, bright square defects with masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def texture() -> np.ndarray:
        base = rng.normal(110, 12, (size, size, 1)) + np.linspace(0, 40, size)[None, :, None]
        return np.clip(np.repeat(base, 3, axis=2), 0, 255)

    folders = {name: root / category / name for name in ("train/good", "test/good", "test/spot", "ground_truth/spot")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        Image.fromarray(texture().astype("uint8")).save(folders["train/good"] / f"{index:03d}.png")
    for index in range(3):
        Image.fromarray(texture().astype("uint8")).save(folders["test/good"] / f"{index:03d}.png")
        image, mask = texture(), np.zeros((size, size), dtype="uint8")
        top, left = rng.integers(4, size - 20, 2)
        image[top : top + 14, left : left + 14] = 250
        mask[top : top + 14, left : left + 14] = 255
        Image.fromarray(image.astype("uint8")).save(folders["test/spot"] / f"{index:03d}.png")
        Image.fromarray(mask).save(folders["ground_truth/spot"] / f"{index:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny MVTec-AD-layout dataset with one category, ``widget``."""
    return write_tiny_mvtec(tmp_path_factory.mktemp("mvtec"))


def flip_tensor_byte(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes of a torch archive, in place; returns that member.

    The archive's structure (zip directory, pickled metadata) stays valid: only the numbers change, as with bit rot
    or a copy that went wrong, and ``torch.load`` still reads the file.
    """
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    content = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", content[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    content[start + member.file_size // 2] ^= 0x40
    path.write_bytes(bytes(content))
    return member.filename
