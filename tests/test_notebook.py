"""The quickstart notebook runs top to bottom (small settings)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, small_clip):
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
    monkeypatch.setenv("QUICKSTART_OUTPUT", str(tmp_path / "quickstart"))
    monkeypatch.setenv("ANOMALIB_FAPROMPT_SHARED", str(Path(small_clip["backbone"]).parents[1]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "small reference CLIP" in text
    assert any("image/png" in output.get("data", {}) for output in outputs), "no heat-map shown inline"
    assert os.path.isfile(tmp_path / "quickstart" / "zero_shot" / "results.csv")
