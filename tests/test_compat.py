"""The private Lightning and anomalib names the plugin relies on: one module, each shim checked against the library.

Each test fails when the installed library changes what a shim relies on (a name gone, or its meaning changed), so
an upgrade breaks here rather than in a user's run. The last tests keep every such access inside ``compat.py`` and
the dependency bounds on the versions tested.
"""

from __future__ import annotations

import ast
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from packaging.specifiers import SpecifierSet
from torch.utils.data import DataLoader, TensorDataset

from anomalib_faprompt import compat

SOURCE = Path(__file__).resolve().parents[1] / "src"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_a_missing_private_name_is_refused_naming_the_versions_tested():
    tested = r"tested with lightning 2\.6-2\.6, anomalib 2\.7-2\.7"
    with pytest.raises(compat.CompatibilityError, match=rf"relies on some\.Thing\._gone, .*{tested}"):
        compat.require(object(), "_gone", "some.Thing")


def test_a_module_is_attached_to_its_trainer_or_to_none():
    module = LightningModule()
    assert compat.attached_trainer(module) is None
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_a_trainers_folder_can_be_replaced(tmp_path):
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "own")
    compat.set_default_root_dir(trainer, str(tmp_path / "shared"))
    assert trainer.default_root_dir == str(tmp_path / "shared")


def test_a_loops_data_source_is_read_and_replaced():
    class Module(LightningModule):
        def test_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=2)

    trainer, module = Trainer(accelerator="cpu", logger=False), Module()
    module.trainer = trainer
    source = compat.loop_data_source(trainer.test_loop)
    assert isinstance(source, compat.DataLoaderSource) and {"instance", "name"} <= set(vars(source))
    replacement = compat.DataLoaderSource(module, "test_dataloader")
    compat.set_loop_data_source(trainer.test_loop, replacement)
    assert compat.loop_data_source(trainer.test_loop) is replacement
    assert len(replacement.dataloader().dataset) == 3
    loader = replacement.dataloader()
    resampled = compat.update_dataloader(loader, torch.utils.data.SequentialSampler(loader.dataset))
    assert resampled.batch_size == 2 and isinstance(resampled.sampler, torch.utils.data.SequentialSampler)


def test_a_rich_bar_gives_its_settings():
    bar = RichProgressBar(leave=True, console_kwargs={"width": 90})
    assert compat.rich_bar_settings(bar) == {"leave": True, "console_kwargs": {"width": 90}}


def test_a_datamodule_reads_its_splits_without_its_split_modes(tiny_mvtec):
    datamodule = MVTecAD(root=tiny_mvtec, category="widget", num_workers=0)
    compat.read_splits(datamodule)
    assert len(datamodule.train_data) == 4 and len(datamodule.test_data) == 6
    assert getattr(datamodule, "val_data", None) is None  # setup's split modes did not run


def test_the_engine_without_version_folders_overrides_the_workspace_step():
    engine_class = compat.EngineWithoutVersionFolders
    assert issubclass(engine_class, Engine)
    assert "_setup_workspace" in engine_class.__dict__
    assert callable(Engine.__dict__["_setup_workspace"])  # the step anomalib's Engine runs at every fit and test


def test_default_thresholds_fill_a_post_processor_without_statistics():
    post_processor = PostProcessor()
    thresholds = compat.Thresholds(0.5, 0.0, 1.0, 2.0, 0.0, 4.0)
    assert compat.set_default_thresholds(post_processor, thresholds)
    assert float(post_processor.image_threshold) == 0.5 and float(post_processor.pixel_threshold) == 2.0
    assert float(post_processor.image_max) == 1.0 and float(post_processor.pixel_max) == 4.0
    assert not compat.set_default_thresholds(post_processor, compat.Thresholds(9, 9, 9, 9, 9, 9))  # statistics kept
    assert float(post_processor.image_threshold) == 0.5


#: Private names of other libraries the sources may use outside compat.py, with why they are not Lightning's or
#: anomalib's: NamedTuple's public API, and torch's documented hook for modules that load state of another shape.
ALLOWED_PRIVATE = {
    "_replace": "typing.NamedTuple's public API",
    "_asdict": "typing.NamedTuple's public API",
    "_load_from_state_dict": "torch.nn.Module's hook for modules loading state of a saved shape",
    "_version": "torch's tensor version counter, the key of the text cache (torch, not Lightning or anomalib)",
}


def _own_private_names(trees: list[ast.AST]) -> set[str]:
    """Private names this package defines itself: functions, classes, globals, and attributes of ``self``/``cls``."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner in {"self", "cls"}:  # its own attributes, not another library's object's
                    names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {name for name in names if name.startswith("_")}


def test_no_private_lightning_or_anomalib_name_is_used_outside_compat():
    files = [path for path in SOURCE.rglob("*.py") if path.name != "compat.py"]
    trees = {path: ast.parse(path.read_text()) for path in files}
    own = _own_private_names(list(trees.values()))
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"lightning", "anomalib"}:
                found += [f"{path.name}: from {node.module} import {alias.name}" for alias in node.names
                          if alias.name.startswith("_")]  # fmt: skip
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and node.attr not in own and node.attr not in ALLOWED_PRIVATE:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert found == [], "use anomalib_faprompt.compat for these"


def test_the_dependency_bounds_are_the_versions_tested():
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for library, (low, high) in compat.TESTED_WITH.items():
        [requirement] = [line for line in dependencies if re.match(rf"{library}\b", line)]
        specifier = SpecifierSet(requirement.removeprefix(library))
        assert f"{low}.0" in specifier and f"{high}.99" in specifier, requirement
        major, minor = (int(part) for part in high.split("."))
        assert f"{major}.{minor + 1}.0" not in specifier, f"{requirement}: no upper bound at the versions tested"
        installed = version(library)
        assert installed in specifier, f"{library} {installed} is outside {requirement}"


def test_thresholds_can_be_set_over_statistics():
    post_processor = PostProcessor()
    compat.set_thresholds(post_processor, compat.Thresholds(0.5, 0.0, 1.0, 2.0, 0.0, 4.0))
    compat.set_thresholds(post_processor, compat.Thresholds(0.7, 0.1, 0.9, 3.0, 1.0, 5.0))  # over statistics
    assert float(post_processor.image_threshold) == pytest.approx(0.7)
    assert float(post_processor.pixel_threshold) == 3.0 and float(post_processor.pixel_min) == 1.0
