"""AuxiliaryDataModule keeps the target's splits and learns from every labelled auxiliary image.

Expected counts come from the files on disk (``Path.glob``) or from the target datamodule set up on its
own, never from the code under test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import Folder, MVTecAD
from PIL import Image

from anomalib_faprompt.data import AuxiliaryDataModule, generate_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("aux"), categories=["stripes", "grain", "disc"], n_train=2, n_test=4, image_size=48
    )


def write_folder_dataset(root: Path, n_train: int = 3, n_normal_test: int = 4, n_abnormal: int = 6) -> Path:
    """A ``Folder`` layout: ``train_good/``, ``test_good/``, ``bad/`` with masks of the same names in ``masks/``."""
    rng = np.random.default_rng(0)
    for folder, count in (("train_good", n_train), ("test_good", n_normal_test), ("bad", n_abnormal)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = rng.integers(60, 140, (40, 40, 3)).astype("uint8")
            if folder == "bad":
                image[10:20, 10:20] = 250
                mask = np.zeros((40, 40), dtype="uint8")
                mask[10:20, 10:20] = 255
                (root / "masks").mkdir(exist_ok=True)
                Image.fromarray(mask).save(root / "masks" / f"{index:03d}.png")
            Image.fromarray(image).save(root / folder / f"{index:03d}.png")
    return root


def folder(root: Path, **kwargs) -> Folder:
    return Folder(
        name="parts",
        root=root,
        normal_dir="train_good",
        normal_test_dir="test_good",
        abnormal_dir="bad",
        mask_dir="masks",
        num_workers=0,
        **kwargs,
    )


def labelled(dataset) -> list[tuple[str, int]]:
    samples = dataset.samples
    return sorted(zip(samples.image_path.astype(str), samples.label_index.astype(int), strict=True))


def counts(dataset) -> tuple[int, int]:
    labels = dataset.samples.label_index.astype(int)
    return int((labels == 0).sum()), int((labels == 1).sum())


@pytest.mark.parametrize(
    "make_target",
    [
        pytest.param(lambda root, _: MVTecAD(root=root, category="disc", num_workers=0), id="MVTecAD"),
        pytest.param(lambda _, parts: folder(parts, seed=0), id="Folder-from_test"),
        pytest.param(lambda _, parts: folder(parts, val_split_mode="same_as_test"), id="Folder-same_as_test"),
    ],
)
def test_target_splits_are_the_targets_own(make_target, synthetic_root, tmp_path):
    parts = write_folder_dataset(tmp_path / "parts")
    datamodule = AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=synthetic_root, category="stripes", num_workers=0)],
        target=make_target(synthetic_root, parts),
        num_workers=0,
    )
    datamodule.setup()
    alone = make_target(synthetic_root, parts)
    alone.setup()

    assert counts(datamodule.test_data) == counts(alone.test_data)
    assert labelled(datamodule.test_data) == labelled(alone.test_data)
    assert labelled(datamodule.val_data) == labelled(alone.val_data)
    assert counts(datamodule.test_data)[0] > 0, "the target's normal test images are kept"


def test_mvtec_target_test_split_holds_every_test_image_on_disk(synthetic_root):
    datamodule = AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=synthetic_root, category="stripes", num_workers=0)],
        target=MVTecAD(root=synthetic_root, category="disc", num_workers=0),
        num_workers=0,
    )
    datamodule.setup()
    test = synthetic_root / "disc" / "test"
    on_disk = (len(list(test.glob("good/*.png"))), len(list(test.glob("[!g]*/*.png"))))
    assert on_disk == (4, 4)
    assert counts(datamodule.test_data) == on_disk


def test_every_labelled_folder_image_is_used(synthetic_root, tmp_path):
    """``Folder`` defaults to ``val_split_mode=from_test``, which moves half of its test images to validation."""
    parts = write_folder_dataset(tmp_path / "parts")
    datamodule = AuxiliaryDataModule(
        auxiliary=[folder(parts)], target=MVTecAD(root=synthetic_root, category="disc", num_workers=0), num_workers=0
    )
    datamodule.setup()
    normal = sorted(str(path) for path in (parts / "test_good").glob("*.png"))
    anomalous = sorted(str(path) for path in (parts / "bad").glob("*.png"))
    train = datamodule.train_data.samples
    assert sorted(train.image_path[train.label_index == 0]) == normal
    assert sorted(train.image_path[train.label_index == 1]) == anomalous
    anomalous_rows = train[train.label_index == 1]
    for image_path, mask_path in zip(anomalous_rows.image_path, anomalous_rows.mask_path, strict=True):
        assert Path(mask_path) == parts / "masks" / Path(image_path).name
    assert datamodule.auxiliary_counts[["normal", "anomalous"]].values.tolist() == [[len(normal), len(anomalous)]]


@pytest.mark.parametrize(
    ("test_split_mode", "val_split_mode"),
    [("from_dir", "same_as_test"), ("from_dir", "from_test"), ("none", "none"), ("none", "same_as_test")],
)
def test_every_labelled_mvtec_image_is_used(test_split_mode, val_split_mode, synthetic_root):
    categories = ("stripes", "grain")
    auxiliary = [
        MVTecAD(
            root=synthetic_root,
            category=category,
            test_split_mode=test_split_mode,
            val_split_mode=val_split_mode,
            seed=0,
            num_workers=0,
        )
        for category in categories
    ]
    datamodule = AuxiliaryDataModule(
        auxiliary=auxiliary, target=MVTecAD(root=synthetic_root, category="disc", num_workers=0), num_workers=0
    )
    datamodule.setup()
    train = datamodule.train_data.samples
    expected_rows = []
    for category in categories:
        test = synthetic_root / category / "test"
        normal = sorted(str(path) for path in test.glob("good/*.png"))
        anomalous = sorted(str(path) for path in test.glob("[!g]*/*.png"))
        expected_rows.append([category, len(normal), len(anomalous)])
        assert sorted(train.image_path[(train.label_index == 0) & train.image_path.str.contains(f"/{category}/")]) == (
            normal
        )
        assert sorted(train.image_path[(train.label_index == 1) & train.image_path.str.contains(f"/{category}/")]) == (
            anomalous
        )
    assert len(train) == sum(normal + anomalous for _, normal, anomalous in expected_rows)
    assert train.image_path.is_unique
    assert (train.mask_path[train.label_index == 1].str.len() > 0).all()
    assert datamodule.auxiliary_counts[["category", "normal", "anomalous"]].values.tolist() == expected_rows


def test_counts_are_logged_per_category(synthetic_root, caplog):
    datamodule = AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=synthetic_root, category=category, num_workers=0) for category in ("stripes", "grain")],
        target=MVTecAD(root=synthetic_root, category="disc", num_workers=0),
        num_workers=0,
    )
    with caplog.at_level(logging.INFO, logger="anomalib_faprompt.data.auxiliary"):
        datamodule.setup()
    lines = [record.getMessage() for record in caplog.records if "prompt learning" in record.getMessage()]
    assert len(lines) == 2
    for line, category in zip(lines, ("stripes", "grain"), strict=True):
        assert f"category='{category}'" in line and "4 normal and 4 anomalous" in line


def test_auxiliary_datamodule_is_left_untouched(synthetic_root):
    """Reading the labelled images does not re-split a datamodule the caller already set up."""
    auxiliary = MVTecAD(root=synthetic_root, category="stripes", val_split_mode="from_test", seed=0, num_workers=0)
    auxiliary.setup()
    before = labelled(auxiliary.test_data), labelled(auxiliary.val_data)
    AuxiliaryDataModule(
        auxiliary=[auxiliary], target=MVTecAD(root=synthetic_root, category="disc", num_workers=0), num_workers=0
    ).setup()
    assert (labelled(auxiliary.test_data), labelled(auxiliary.val_data)) == before


# Prompt learning on the auxiliary data: masks that say nothing, epochs nobody set ------------------------------------


def fit_briefly(root: Path, small_clip: dict, tmp_path: Path, **engine_args) -> tuple:
    """FAPrompt fitted by anomalib's Engine on ``stripes`` (target ``disc``) at the small CLIP's native 112 px."""
    from anomalib.engine import Engine

    from anomalib_faprompt import FAPrompt

    datamodule = AuxiliaryDataModule(
        [MVTecAD(root=root, category="stripes", num_workers=0)], MVTecAD(root=root, category="disc", num_workers=0),
        train_batch_size=4, num_workers=0,
    )  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, **engine_args)
    model = FAPrompt(**{**small_clip, "image_size": 112}, visualizer=False)
    engine.fit(model, datamodule=datamodule)
    return engine, model


def test_anomalous_training_images_with_empty_masks_are_named_in_one_warning(synthetic_root, small_clip, tmp_path,
                                                                             caplog):  # fmt: skip
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    defects = sorted(path for path in (root / "stripes" / "ground_truth").iterdir() if path.is_dir())
    emptied = defects[0]
    for mask in emptied.glob("*.png"):  # a broken export: every mask of one defect all zero
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    anomalous = len(list((root / "stripes" / "ground_truth").rglob("*.png")))
    empty = len(list(emptied.glob("*.png")))

    with caplog.at_level(logging.WARNING):
        fit_briefly(root, small_clip, tmp_path, max_epochs=1, limit_train_batches=1)

    warnings = [record.getMessage() for record in caplog.records if "all-zero mask" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{empty} of the {anomalous} anomalous images of FAPrompt's training data have an "
                                  "all-zero mask")  # fmt: skip
    assert f"{emptied} ({empty} of {empty})" in warnings[0]


def test_intact_masks_give_no_warning_and_unset_epochs_are_the_methods_default(synthetic_root, small_clip, tmp_path,
                                                                               caplog):  # fmt: skip
    """Lightning would run 1000 epochs when neither the model nor the engine sets max_epochs."""
    with caplog.at_level(logging.INFO):
        engine, model = fit_briefly(synthetic_root, small_clip, tmp_path, limit_train_batches=1, limit_val_batches=0)
    assert model.default_max_epochs == 15
    assert engine.trainer.max_epochs == 15 and engine.trainer.current_epoch == 15
    assert "FAPrompt: max_epochs was not set (model or trainer): learning for the method's default 15 epochs" in (
        caplog.text
    )
    assert "all-zero mask" not in caplog.text
