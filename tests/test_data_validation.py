"""Inputs anomalib would read wrongly are refused up front, naming the file and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from PIL import Image

from anomalib_faprompt import FAPrompt
from anomalib_faprompt.data import AuxiliaryDataModule, DataValidationError, validate_samples
from anomalib_faprompt.data import validation as validation_module


@pytest.fixture
def widget(tiny_mvtec: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny MVTec-layout dataset (category ``widget``) to damage."""
    return Path(shutil.copytree(tiny_mvtec, tmp_path / "mvtec"))


def write_16bit(path: Path) -> Path:
    gradient = np.linspace(1000, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gradient).save(path)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def scoring_must_not_start(*args, **kwargs):
    raise AssertionError("a batch was scored before the data was refused")


def samples(image_path: Path, mask_path: Path | str = "", label_index: int = 1) -> pd.DataFrame:
    return pd.DataFrame({"image_path": [str(image_path)], "mask_path": [str(mask_path)], "label_index": [label_index]})


def auxiliary_setup(root: Path, target_root: Path) -> None:
    AuxiliaryDataModule(
        auxiliary=[MVTecAD(root=root, category="widget", num_workers=0)],
        target=MVTecAD(root=target_root, category="widget", num_workers=0),
        num_workers=0,
    ).setup()


def test_16bit_png_is_refused(widget):
    image = write_16bit(widget / "widget" / "test" / "good" / "001.png")
    assert read_image(image).min() == 1.0, "anomalib's read_image clips 16-bit grey to white"
    with pytest.raises(DataValidationError, match=r"001\.png.*16-bit.*convert it to 8-bit"):
        validate_samples(samples(image, label_index=0), "test split")
    with pytest.raises(
        DataValidationError, match=r"auxiliary MVTecAD\(category='widget'\).*test/good/001\.png.*16-bit"
    ):
        auxiliary_setup(widget, widget)


def test_16bit_rgb_png_reads_correctly_and_is_accepted(tmp_path):
    """PIL reduces 48-bit RGB PNGs to 8 bits per channel itself (anomalib reads them right)."""
    import cv2

    rgb16 = np.random.default_rng(0).integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)  # BGR order
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb16.png")), (rgb16 >> 8)[..., ::-1].astype(np.uint8))
    validate_samples(samples(tmp_path / "rgb16.png", label_index=0), "test split")


def test_mask_with_another_aspect_ratio_is_refused(widget):
    image = widget / "widget" / "test" / "spot" / "002.png"
    mask = widget / "widget" / "ground_truth" / "spot" / "002_mask.png"
    Image.open(mask).resize((64, 32)).save(mask)
    with pytest.raises(DataValidationError, match=r"002_mask\.png is 64x32.*002\.png is 64x64"):
        validate_samples(samples(image, mask), "test split")


def test_mask_at_another_resolution_with_the_same_aspect_ratio_is_accepted(widget):
    """Image and mask are resized together to the model's input, so a half-size mask stays aligned."""
    image = widget / "widget" / "test" / "spot" / "002.png"
    mask = widget / "widget" / "ground_truth" / "spot" / "002_mask.png"
    Image.open(mask).resize((32, 32), Image.Resampling.NEAREST).save(mask)
    validate_samples(samples(image, mask), "test split")


def test_mask_with_another_aspect_ratio_is_refused_by_engine_test(widget, small_clip, tmp_path):
    mask = widget / "widget" / "ground_truth" / "spot" / "001_mask.png"
    Image.open(mask).resize((64, 40)).save(mask)
    datamodule = MVTecAD(root=widget, category="widget", eval_batch_size=2, num_workers=0)
    model = FAPrompt(**small_clip, allow_untrained_prompts=True)
    model.test_step = scoring_must_not_start  # the refusal comes first
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(DataValidationError, match=r"test data.*001_mask\.png is 64x40.*spot/001\.png is 64x64"):
        engine.test(model, datamodule=datamodule)


def test_truncated_png_is_refused(widget, small_clip, tmp_path):
    image = truncate(widget / "widget" / "test" / "good" / "002.png")
    with pytest.raises(OSError, match="truncated"):  # what anomalib does with it, mid-run, naming no file
        read_image(image)
    with pytest.raises(DataValidationError, match=r"test/good/002\.png.*truncated or damaged"):
        validate_samples(samples(image, label_index=0), "test split")
    model = FAPrompt(**small_clip, allow_untrained_prompts=True)
    model.test_step = scoring_must_not_start
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(DataValidationError, match=r"test/good/002\.png.*truncated or damaged"):
        engine.test(model, datamodule=MVTecAD(root=widget, category="widget", num_workers=0))


def test_truncated_mask_is_refused(widget):
    mask = truncate(widget / "widget" / "ground_truth" / "spot" / "000_mask.png")
    with pytest.raises(DataValidationError, match=r"000_mask\.png.*truncated or damaged"):
        validate_samples(samples(widget / "widget" / "test" / "spot" / "000.png", mask), "test split")


def test_missing_mask_is_refused_naming_the_image_and_the_expected_mask(widget, tiny_mvtec):
    (widget / "widget" / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match="Must have equal len keys"):  # anomalib's own message
        MVTecAD(root=widget, category="widget", num_workers=0).setup()
    expected = r"test/spot/001\.png has no mask.*ground_truth/spot/001_mask\.png"
    with pytest.raises(DataValidationError, match=rf"auxiliary MVTecAD\(category='widget'\).*{expected}"):
        auxiliary_setup(widget, tiny_mvtec)
    with pytest.raises(DataValidationError, match=rf"target MVTecAD\(category='widget'\).*{expected}"):
        auxiliary_setup(tiny_mvtec, widget)


def test_missing_mask_is_refused_by_engine_test_before_anomalib_reads_the_dataset(widget, small_clip, tmp_path):
    (widget / "widget" / "ground_truth" / "spot" / "001_mask.png").unlink()
    model = FAPrompt(**small_clip, allow_untrained_prompts=True)
    model.test_step = scoring_must_not_start
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu")
    expected = r"MVTecAD\(category='widget'\).*test/spot/001\.png has no mask.*ground_truth/spot/001_mask\.png"
    with pytest.raises(DataValidationError, match=expected):
        engine.test(model, datamodule=MVTecAD(root=widget, category="widget", num_workers=0))


def test_mask_file_missing_from_samples_is_refused(widget):
    image = widget / "widget" / "test" / "spot" / "001.png"
    absent = widget / "widget" / "ground_truth" / "spot" / "absent_mask.png"
    with pytest.raises(DataValidationError, match=r"spot/001\.png: its mask .*absent_mask\.png does not exist"):
        validate_samples(samples(image, absent), "test split")


def test_anomalous_image_without_mask_in_a_segmentation_dataset_is_refused(widget):
    spot = widget / "widget" / "test" / "spot"
    masks = widget / "widget" / "ground_truth" / "spot"
    frame = pd.DataFrame(
        {
            "image_path": [str(spot / "000.png"), str(spot / "001.png")],
            "mask_path": [str(masks / "000_mask.png"), ""],
            "label_index": [1, 1],
        }
    )
    with pytest.raises(DataValidationError, match=r"spot/001\.png has no mask"):
        validate_samples(frame, "test split")


def test_classification_dataset_without_any_mask_is_accepted(widget):
    spot = widget / "widget" / "test" / "spot"
    frame = pd.DataFrame({"image_path": [str(spot / "000.png"), str(spot / "001.png")], "mask_path": ["", ""]})
    frame["label_index"] = 1
    validate_samples(frame, "test split")


def test_every_problem_is_listed_in_one_error(widget):
    first = write_16bit(widget / "widget" / "test" / "good" / "000.png")
    second = truncate(widget / "widget" / "test" / "good" / "001.png")
    frame = pd.concat([samples(first, label_index=0), samples(second, label_index=0)], ignore_index=True)
    with pytest.raises(DataValidationError, match=r"Refusing test split: 2 problems with its files") as error:
        validate_samples(frame, "test split")
    assert "good/000.png" in str(error.value) and "good/001.png" in str(error.value)


def test_predict_on_a_folder_refuses_16bit_images(small_clip, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_16bit(folder / "scan.png")
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu")
    model = FAPrompt(**small_clip, allow_untrained_prompts=True)
    model.predict_step = scoring_must_not_start
    with pytest.raises(DataValidationError, match=r"predict data.*scan\.png.*16-bit"):
        engine.predict(model, data_path=folder)


def test_a_dataset_is_validated_once(widget, monkeypatch):
    frame = MVTecAD(root=widget, category="widget", num_workers=0)
    frame.setup()
    calls = []
    inspect = validation_module._inspect
    monkeypatch.setattr(validation_module, "_inspect", lambda path: calls.append(path) or inspect(path))
    validate_samples(frame.test_data.samples, "test split")
    assert len(calls) == len(frame.test_data.samples) + 3  # images and the 3 masks
    validate_samples(frame.test_data.samples.copy(), "the same split again")
    assert len(calls) == len(frame.test_data.samples) + 3
    truncate(widget / "widget" / "test" / "good" / "000.png")  # a changed file is checked again
    with pytest.raises(DataValidationError, match=r"good/000\.png"):
        validate_samples(frame.test_data.samples, "test split")


# Read without an error, but not as their owner expects: named once, not refused -------------------------------------


def test_files_mvtecad_leaves_out_are_named(widget, tmp_path, caplog):
    from anomalib_faprompt.data.notices import skipped_image_files
    from anomalib_faprompt.data.validation import check_masks_before_setup

    good = widget / "widget" / "train" / "good"
    Image.open(good / "000.png").convert("RGB").save(good / "100.jpg")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(good / "001.png", outside)
    (good / "101.png").symlink_to(outside)
    datamodule = MVTecAD(root=widget, category="widget", num_workers=0)
    datamodule.setup()
    listed = {Path(path).name for path in datamodule.train_data.samples.image_path}
    assert {"100.jpg", "101.png"}.isdisjoint(listed)  # anomalib leaves them out without a word

    assert skipped_image_files(datamodule) == [
        f"{good / '100.jpg'} (.jpg files are not read)",
        f"{good / '101.png'} (a link to {outside}, outside the category folder)",
    ]
    with caplog.at_level("WARNING"):
        check_masks_before_setup(datamodule)
        check_masks_before_setup(datamodule)
    notices = [record.getMessage() for record in caplog.records if "are not in the data" in record.getMessage()]
    assert len(notices) == 1 and "2 image file(s) under" in notices[0] and "Convert them to PNG" in notices[0]


def test_images_with_an_exif_orientation_are_named_once(widget, caplog):
    image = widget / "widget" / "test" / "spot" / "000.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° by a viewer
    with Image.open(image) as opened:
        opened.save(image, exif=exif)
    table = samples(image, widget / "widget" / "ground_truth" / "spot" / "000_mask.png")
    with caplog.at_level("WARNING"):
        validate_samples(table, "test split")
        validate_samples(table, "test split")
    notices = [record.getMessage() for record in caplog.records if "EXIF orientation" in record.getMessage()]
    assert notices == [
        f"1 image(s) of test split carry an EXIF orientation (a viewer rotates or flips them), which anomalib's image "
        f"reader ignores: the model sees them as stored, and masks drawn on the rotated view do not match them: "
        f"{image}. Save them rotated (PIL.ImageOps.exif_transpose) if their masks were drawn that way."
    ]
