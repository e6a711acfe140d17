"""The synthetic dataset generator and the auxiliary-training datamodule."""

from __future__ import annotations

import numpy as np
import pytest
from anomalib.data import Folder, MVTecAD
from PIL import Image

from anomalib_faprompt.data import CATEGORIES, AuxiliaryDataModule, SyntheticAD, generate_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=3, n_test=4, image_size=96)


def test_every_category_reads_as_mvtec_with_masks(synthetic_root):
    for category in CATEGORIES:
        datamodule = MVTecAD(root=synthetic_root, category=category, num_workers=0)
        datamodule.setup()
        test = datamodule.test_data.samples
        assert len(datamodule.train_data) == 3 and len(test) == 8
        anomalous = test[test.label_index == 1]
        assert len(anomalous) == 4
        for mask_path in anomalous.mask_path:
            mask = np.asarray(Image.open(mask_path))
            assert mask.shape == (96, 96)
            assert 0 < (mask > 127).mean() < 0.25, "a defect covers part of the image"


def test_generation_is_deterministic(tmp_path):
    first = generate_synthetic_dataset(tmp_path / "a", categories=["disc"], n_train=1, n_test=1, seed=3)
    second = generate_synthetic_dataset(tmp_path / "b", categories=["disc"], n_train=1, n_test=1, seed=3)
    files = sorted(path.relative_to(first) for path in first.rglob("*.png"))
    assert files == sorted(path.relative_to(second) for path in second.rglob("*.png"))
    for path in files:
        assert np.array_equal(np.asarray(Image.open(first / path)), np.asarray(Image.open(second / path)))


def test_unknown_synthetic_category(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown synthetic categories/defects \['marble'\]"):
        generate_synthetic_dataset(tmp_path, categories=["marble"])


def test_auxiliary_datamodule_trains_on_labelled_splits_and_tests_on_target(synthetic_root):
    datamodule = AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=synthetic_root, category=c, num_workers=0) for c in ("stripes", "grain")],
        target=MVTecAD(root=synthetic_root, category="disc", num_workers=0),
        train_batch_size=4,
        num_workers=0,
    )
    datamodule.setup()
    train = datamodule.train_data.samples
    assert len(train) == 16 and train.label_index.sum() == 8
    assert {path.split("/")[-4] for path in train.image_path} == {"stripes", "grain"}
    assert all(path.split("/")[-4] == "disc" for path in datamodule.test_data.samples.image_path)
    assert datamodule.category == "disc"


def test_auxiliary_data_without_masks_is_refused(synthetic_root):
    no_masks = Folder(
        name="no_masks",
        root=synthetic_root / "stripes",
        normal_dir="test/good",
        abnormal_dir="test/scratch",
        num_workers=0,
    )
    datamodule = AuxiliaryDataModule(
        auxiliary=[no_masks], target=MVTecAD(root=synthetic_root, category="disc", num_workers=0), num_workers=0
    )
    with pytest.raises(ValueError, match=r"without pixel masks.*image-level-only training is not supported"):
        datamodule.setup()


def test_a_category_is_the_same_whether_generated_alone_or_with_others(tmp_path):
    alone = generate_synthetic_dataset(tmp_path / "alone", categories=["plate"], n_train=1, n_test=1)
    together = generate_synthetic_dataset(tmp_path / "all", categories=["disc", "plate"], n_train=1, n_test=1)
    files = sorted(path.relative_to(alone) for path in alone.rglob("*.png"))
    assert files
    for path in files:
        assert np.array_equal(np.asarray(Image.open(alone / path)), np.asarray(Image.open(together / path)))


def test_synthetic_datamodule_generates_on_first_use_and_is_named(tmp_path):
    datamodule = SyntheticAD(root=tmp_path / "synthetic", category="disc", n_train=2, n_test=2, num_workers=0)
    assert datamodule.name == "SyntheticAD"
    datamodule.prepare_data()
    datamodule.setup()
    assert len(datamodule.train_data) == 2 and len(datamodule.test_data) == 4
    reference = generate_synthetic_dataset(tmp_path / "reference", categories=["disc"], n_train=2, n_test=2)
    for path in sorted(reference.rglob("*.png")):
        written = tmp_path / "synthetic" / path.relative_to(reference)
        assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(path)))
    assert not [path.name for path in (tmp_path / "synthetic").iterdir() if path.name != "disc"], "no leftovers"


def test_synthetic_datamodule_refuses_data_generated_with_other_settings(tmp_path):
    SyntheticAD(root=tmp_path, category="disc", n_train=2, n_test=2).prepare_data()
    SyntheticAD(root=tmp_path, category="disc", n_train=2, n_test=2).prepare_data()  # same settings: reused
    with pytest.raises(ValueError, match=r"n_train=3.*n_train=2|n_train.*2.*3"):
        SyntheticAD(root=tmp_path, category="disc", n_train=3, n_test=2).prepare_data()


def test_synthetic_datamodule_refuses_unknown_category_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"category 'marble'.*disc"):
        SyntheticAD(root=tmp_path, category="marble")


def test_synthetic_datamodule_by_short_name():
    import anomalib.data

    assert anomalib.data.SyntheticAD is SyntheticAD
