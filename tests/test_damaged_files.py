"""Damaged, truncated and foreign prompt files and checkpoints are refused by name on every path that reads them.

``torch.load`` does not compare a zip archive's checksums: a prompt file or checkpoint whose tensor bytes changed
on disk loads and scores. Each test damages the numbers only (:func:`conftest.flip_tensor_byte`), shows that torch
still reads the file, and checks that the project refuses it, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_faprompt import FAPrompt
from anomalib_faprompt.file_integrity import DamagedFileError
from anomalib_faprompt.prompt_weights import load_prompt_weights
from conftest import flip_tensor_byte
from test_export import write_checkpoint


@pytest.fixture(scope="module")
def trained(small_clip, released_prompts) -> FAPrompt:
    """FAPrompt with the fixture's prompts loaded as if trained (``prompt_weights`` stays ``None``)."""
    model = FAPrompt(**small_clip)
    load_prompt_weights(model.model, released_prompts["FAPrompt"], "FAPrompt")
    return model


def cli_error(arguments: list[str], capsys) -> str:
    """The last stderr line of ``anomalib <arguments>`` built in this process (classes instantiated, not run)."""
    from anomalib.cli.cli import AnomalibCLI

    with pytest.raises(SystemExit) as exit_info:
        AnomalibCLI(arguments, run=False)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "Union subtypes" not in error, error[-3000:]
    return [line for line in error.splitlines() if line.strip()][-1]


def test_a_prompt_file_whose_tensor_bytes_changed_is_refused_by_name(trained, small_clip, tmp_path):
    path = trained.save_prompt_weights(tmp_path / "prompts.pt")
    member = flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch reads it without a word: the numbers are simply different
    with pytest.raises(DamagedFileError, match=rf"'{path}' is damaged: the bytes of its member '{member}'"):
        FAPrompt(**small_clip, prompt_weights=path)


def test_a_checkpoint_whose_tensor_bytes_changed_is_refused_on_every_path(trained, small_clip, tiny_mvtec, tmp_path,
                                                                          capsys):  # fmt: skip
    checkpoint = write_checkpoint(trained, tmp_path / "model.ckpt")
    flip_tensor_byte(checkpoint)
    torch.load(checkpoint, weights_only=False)
    damaged = rf"'{checkpoint}' is damaged"

    with pytest.raises(DamagedFileError, match=damaged):
        FAPrompt.load_from_checkpoint(checkpoint)
    with pytest.raises(DamagedFileError, match=damaged):  # as prompts
        FAPrompt(**small_clip, prompt_weights=checkpoint)
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    with pytest.raises(DamagedFileError, match=damaged):
        engine.test(FAPrompt(**small_clip), datamodule=datamodule, ckpt_path=checkpoint)
    data = ["--data", "MVTecAD", "--data.root", str(tiny_mvtec), "--data.category", "widget"]
    last = cli_error(["test", "--model", "FAPrompt", "--ckpt_path", str(checkpoint), *data], capsys)
    assert last.startswith(f"error: Checkpoint --ckpt_path '{checkpoint}' is damaged"), last


@pytest.mark.parametrize("damage", ["cut short", "tail zeroed"])
def test_a_prompt_file_cut_short_is_refused_by_name(trained, small_clip, tmp_path, damage):
    path = trained.save_prompt_weights(tmp_path / "prompts.pt")
    content = path.read_bytes()
    cut = len(content) * 2 // 3
    path.write_bytes(content[:cut] if damage == "cut short" else content[:cut] + bytes(len(content) - cut))
    with pytest.raises(ValueError, match=rf"'{path}' is truncated or damaged: it starts as a torch archive"):
        FAPrompt(**small_clip, prompt_weights=path)


def test_a_text_file_given_as_prompt_weights_is_refused_in_one_line(small_clip, tiny_mvtec, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("prompts learned on MVTec AD, see run 12\n")
    with pytest.raises(ValueError, match=rf"'{notes}'.*not a file written by torch.save"):
        FAPrompt(**small_clip, prompt_weights=notes)
    model = ["--model", "FAPrompt", *(f"--model.{key}={value}" for key, value in small_clip.items())]
    data = ["--data", "MVTecAD", "--data.root", str(tiny_mvtec), "--data.category", "widget"]
    last = cli_error(["test", *model, "--model.prompt_weights", str(notes), *data], capsys)
    assert last.startswith(f"error: Could not read prompt weights file '{notes}'"), last


def test_saving_prompts_to_a_directory_names_it(trained, tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"'{tmp_path}': it is a directory.*'{tmp_path / 'prompts.pt'}'"):
        trained.save_prompt_weights(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_intact_file_is_read_once_and_loads(trained, small_clip, tmp_path):
    path: Path = trained.save_prompt_weights(tmp_path / "prompts.pt")
    loaded = FAPrompt(**small_clip, prompt_weights=path)
    for name, value in trained.model.prompt_state_dict().items():
        assert torch.equal(loaded.model.prompt_state_dict()[name], value), name
