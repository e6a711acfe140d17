"""The quickstart notebook runs top to bottom (small settings), finds the fixtures, and prints no warning floods."""

from __future__ import annotations

import collections
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def execute(notebook: nbformat.NotebookNode, cwd: Path) -> tuple[list, str]:
    """Run ``notebook`` in a kernel started in ``cwd``; return its outputs and their text."""
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    texts = []
    for output in outputs:
        texts.append(output.get("text", ""))
        texts.append(output.get("data", {}).get("text/plain", ""))
        texts.append("".join(output.get("traceback", [])))
    return outputs, "\n".join(texts)


@pytest.fixture
def no_shared_variable(monkeypatch):
    monkeypatch.delenv("ANOMALIB_FAPROMPT_SHARED", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_quickstart_notebook_executes_from_notebooks_folder(tmp_path, monkeypatch, small_clip, no_shared_variable):
    """Run as Jupyter runs it, in ``notebooks/`` of a clone with ``shared/`` beside it and no variable set."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, repo / "notebooks" / NOTEBOOK.name)
    shared = tmp_path.resolve() / "shared"
    shared.symlink_to(Path(small_clip["backbone"]).parents[1], target_is_directory=True)
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
    monkeypatch.setenv("QUICKSTART_OUTPUT", str(tmp_path / "quickstart"))

    outputs, text = execute(nbformat.read(repo / "notebooks" / NOTEBOOK.name, as_version=4), repo / "notebooks")

    assert not [output for output in outputs if output.output_type == "error"], text[-3000:]
    assert f"small reference CLIP of {shared / 'golden'}" in text, text[:3000]
    assert "randomly initialised" not in text
    assert any("image/png" in output.get("data", {}) for output in outputs), "no heat-map shown inline"
    assert os.path.isfile(tmp_path / "quickstart" / "zero_shot" / "results.csv")
    # No warning floods: none of the progress-bar warnings, and no warning shown twice.
    assert 'install "ipywidgets"' not in text and "IProgress not found" not in text, text[:3000]
    warnings = collections.Counter(re.findall(r"^.*\w+Warning: .*$", text, flags=re.MULTILINE))
    assert not {line: count for line, count in warnings.items() if count > 1}, warnings


@pytest.mark.slow
def test_quickstart_notebook_takes_fixtures_from_the_variable(tmp_path, monkeypatch, small_clip, no_shared_variable):
    """ANOMALIB_FAPROMPT_SHARED wins wherever the kernel starts; a wrong one is named, not replaced by a random CLIP."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = notebook.cells[:2]  # the introduction and the cell that picks the CLIP
    shared = Path(small_clip["backbone"]).parents[1]
    monkeypatch.setenv("ANOMALIB_FAPROMPT_SHARED", str(shared))
    _, text = execute(notebook, tmp_path)
    assert f"small reference CLIP of {shared.resolve() / 'golden'}" in text, text

    monkeypatch.setenv("ANOMALIB_FAPROMPT_SHARED", str(tmp_path / "elsewhere"))
    with pytest.raises(Exception, match=r"ANOMALIB_FAPROMPT_SHARED=.*elsewhere has no golden/clip_small_seed0.pt"):
        execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
