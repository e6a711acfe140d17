"""The zero-shot protocol as an anomalib pipeline: ``anomalib zero_shot --config <protocol>.yaml``.

Each model that learns prompts on auxiliary data (AnomalyCLIP, FAPrompt) is fitted once on the auxiliary data and then
tested unchanged on every category of every target dataset; zero-shot baselines (WinClip) are
tested directly, and one-class baselines (PatchCore, or any anomalib model) are fitted on each
target category's normal images. Metrics are the papers' four — image AUROC and AP, pixel AUROC
and AUPRO (FPR ≤ 0.3) — computed by anomalib's metrics on the models' *raw* scores and maps
(no normalisation, no thresholds). Results: ``results.csv``, ``results.md`` and ``results.png``
(the means, with AUROC's 50 % chance level), plus heat-maps (:class:`~anomalib_faprompt.visualization.
HeatMapVisualizer`: Image, Gt Mask, Pred Mask, Image + Anomaly Map, each titled). A model whose backbone has
untrained weights, such as the random small CLIP of ``shared/golden``, is named as such below the table, in
the CSV's ``notice`` column, on the chart and on its heat-maps.

The results tree, one level per model, settings, dataset and category::

    <results_dir>/
        results.csv, results.md, results.png, .lock
        <Model>/<fingerprint>/                      e.g. FAPrompt/30a87f716184/
            settings.json, prompts.pt               (prompts only for models whose prompts are learned here)
            rows/<dataset>_<category>-<fingerprint>.json
            weights/lightning/model.ckpt, prompts.pt    the prompt learning's Lightning checkpoint
            <dataset>/<category>/                   e.g. SyntheticAD/disc/: the datamodule's name
                images/<defect>/<image>.png         heat-maps
                weights/lightning/model.ckpt        the tested model (thresholds; a baseline's fit)
                k<k>_s<sampling>/                   few-shot protocol (k > 0): images/, weights/ of that shot

Anomalib's Engine would nest ``<Model>/<Dataset>/<category>/v<N>`` (and a ``latest`` link) inside each folder
on every fit and test; the pipeline's :class:`FolderEngine` writes into the folder itself, as a folder is only
rewritten when its row is recomputed.

Resuming: each model of the config works in its own folder, ``<results_dir>/<Model>/<fingerprint>/``,
where the fingerprint is a hash of the canonical JSON of the *effective* settings its prompts (or, for
a baseline, its results) depend on: the model class and all its init args, defaults included (its
``hparams``), the seed and, when prompts are learned, the auxiliary dataset (class, init args,
categories), ``max_epochs`` and ``train_batch_size``; prompts given as ``prompt_weights`` count by
their file's SHA-256. The folder holds these settings (``settings.json``), the learned prompts
(``prompts.pt``) and one file per target category (``rows/<dataset>_<category>-<fingerprint>.json``)
whose fingerprint adds the target dataset (class and init args), the category, the metrics and the
SHA-256 of the prompts. A rerun reuses exactly the files whose fingerprint matches and computes the
rest, so an interrupted run resumes where it stopped and a run with other settings gets folders and
rows of its own, leaving earlier results as they are. Not in the fingerprints, as they do not change
the numbers: ``num_workers``, ``results_dir``, ``accelerator``, the models' ``visualizer``,
``evaluator`` and ``post_processor`` (the pipeline sets its own) and the auxiliary datasets' batch
sizes (only the top-level ``train_batch_size`` trains), nor ``devices``, ``num_nodes`` and ``strategy`` (the
numbers agree within float rounding, see below). Not detected either: changes to the files
under a dataset's root or to the code; use a new ``results_dir`` after those.

Few-shot protocol: ``k_shot: [0, 1, 2, 4]`` and ``samplings: 5`` add rows per k > 0 and sampling, each with
its own row file (``rows/<dataset>_<category>-k<k>-s<sampling>-<fingerprint>.json``, whose fingerprint adds k,
the reference seed and the reference files), and the table gives mean ± std over the samplings; see
:mod:`~anomalib_faprompt.pipelines.few_shot`. Without them (or with ``k_shot: [0]``) rows and table are the above.

Two variants of one model (e.g. AnomalyCLIP with ``feature_layers: [6, 12, 18, 24]`` and ``[24]``)
are named in the table by the init args that differ, e.g. ``AnomalyCLIP[feature_layers=24]``; a model
listed twice with the same effective settings is refused.

Every result file is written atomically (a temporary file in the same folder, then a rename); a
file left unreadable by an earlier kill is named in a warning, moved aside as
``<name>.corrupt-<time>`` and recomputed. A run holds a lock on ``<results_dir>/.lock`` (``flock``,
released by the system when the process ends, even if killed); a second run into the same folder is
refused with the holder's pid.

Several processes: ``devices: N`` (and ``num_nodes: M`` machines) run every fit and test with Lightning's DDP
(``strategy: ddp``; ``auto`` means it too). Lightning starts the other processes by running the same
command again, so each runs the whole pipeline and takes the same decisions; rank 0 alone holds the lock and writes
the files, and the others read the prompts it wrote (over several machines ``results_dir`` must be on storage they
share). ``train_batch_size`` stays the global batch of prompt learning, divided among the processes (it must be a
multiple of their number), so prompts and metrics are those of one process within float rounding, and evaluation
scores each image once (:mod:`anomalib_faprompt.distributed`). Baselines fitted on a target's normal images
(PatchCore) are refused: run them in a config with ``devices: 1``.

Config (YAML)::

    seed: 0
    accelerator: auto
    devices: 1                             # optional: processes per machine (DDP above 1), and
    num_nodes: 1                           # optional: machines
    max_epochs: 15
    train_batch_size: 8                    # the global batch, over all processes
    eval_batch_size: 8
    num_workers: 4
    results_dir: results/zero_shot
    k_shot: [0, 1, 2, 4]                   # optional, the few-shot protocol (default [0])
    samplings: 5                           # optional, draws of the references per k > 0 (default 1)
    auxiliary:
      dataset: {class_path: MVTecAD, init_args: {root: ./datasets/MVTecAD}}
      categories: [bottle, cable]          # or "all"
    targets:
      - dataset: {class_path: Visa, init_args: {root: ./datasets/VisA}}
        categories: all
    models:
      - class_path: FAPrompt
      - {class_path: Patchcore, init_args: {backbone: wide_resnet50_2}}

Example:
    >>> from anomalib_faprompt.pipelines import ZeroShot
    >>> ZeroShot().run_config("configs/zero_shot/synthetic.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.pipelines.components.base import Pipeline, Runner
from lightning.pytorch import seed_everything

from anomalib_faprompt.cli import settings_errors_in_one_line
from anomalib_faprompt.distributed import launched_as_rank_zero

from .config import ZeroShotConfig, load_config
from .datasets import DatasetSpec, check_duplicate_targets, check_overlap
from .few_shot import Shot, plan_references, plan_shots
from .planner import ModelVariant, check_distributed, engine_arguments, plan_models
from .report import summarise, to_markdown, write_results
from .result_files import ResultsDirLockedError, remove_temporaries, results_dir_lock
from .runner import METRICS, ModelRun
from .termination import stop_on_sigterm

__all__ = ["METRICS", "RunPlan", "ZeroShot", "plan_run"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunPlan:
    """Everything a run decides before it writes anything: data, shots, references, models, trainer settings."""

    config: ZeroShotConfig
    auxiliary: DatasetSpec
    targets: list[DatasetSpec]
    shots: list[Shot]
    references: dict[tuple[str, str, Shot], tuple[str, ...]]
    variants: list[ModelVariant]
    engine_args: dict[str, Any]
    processes: int
    #: (dataset name, category) of targets that are also auxiliary categories (``allow_overlap``).
    overlap: set[tuple[str, str]]

    @property
    def results_dir(self) -> Path:
        """Where the results go."""
        return Path(self.config.results_dir)

    @property
    def writer(self) -> bool:
        """Whether this process writes the files (rank 0; the others compute the same and read them)."""
        return self.processes == 1 or launched_as_rank_zero()


def plan_run(config: ZeroShotConfig) -> RunPlan:
    """Plan a run and check it, before any folder is made: a refused config leaves nothing behind.

    Raises:
        ValueError: For targets listed twice, auxiliary categories among the targets (without ``allow_overlap``),
            ``k_shot`` above a category's normal images, what several processes cannot compute as one, ….
    """
    shots = plan_shots({"seed": config.seed, "k_shot": config.k_shot, "samplings": config.samplings})
    seed_everything(config.seed, workers=True)
    defaults = config.datamodule_defaults
    auxiliary = DatasetSpec(dataclasses.asdict(config.auxiliary), defaults)
    targets = [DatasetSpec(dataclasses.asdict(target), defaults) for target in config.targets]
    check_duplicate_targets(targets)
    references = plan_references(targets, shots)
    engine_args, processes = engine_arguments(config)
    variants = plan_models(config, auxiliary, shots)
    check_distributed(variants, config, processes)
    learning = any(variant.learns_prompts for variant in variants)  # only then is the auxiliary data used
    overlap = check_overlap(auxiliary if learning else None, targets, config.allow_overlap)
    return RunPlan(config, auxiliary, targets, shots, references, variants, engine_args, processes, overlap)


class ZeroShot(Pipeline):
    """Fit zero-shot models once on auxiliary data, test them on every target category, tabulate.

    An anomalib ``Pipeline`` (``anomalib zero_shot`` finds it in the CLI's pipeline registry) that runs itself:
    anomalib's ``Pipeline.run`` logs a runner's exception to a file and goes on, where a table whose every row must
    be right has to stop with the error; its parts are the config (:mod:`.config`), the plan (:func:`plan_run`,
    :mod:`.planner`), the runs (:mod:`.runner`) and the report (:mod:`.report`).
    """

    def _setup_runners(self, args: dict) -> list[Runner]:
        del args
        return []  # see the class docstring: run() runs the plan itself

    def run(self, args: Any = None) -> pd.DataFrame:
        """Run from CLI arguments (a namespace with ``config``); a bad config ends it with one ``error:`` line."""
        path = args.config if args is not None else self.get_parser().parse_args().config
        with settings_errors_in_one_line(ResultsDirLockedError):
            return self.run_config(path)

    def run_config(self, config: dict[str, Any] | str | Path) -> pd.DataFrame:
        """Run the protocol described by a config mapping or YAML file; returns the results table.

        Raises:
            ResultsDirLockedError: If another run is writing into the config's ``results_dir``.
            ValueError: For a bad config (unknown settings or categories, ``max_epochs`` below 1, ``k_shot`` above a
                category's normal images, …), naming the key.
            Terminated: On SIGTERM (exit status 143), with the finished prompts and rows kept.
        """
        plan = plan_run(load_config(config))
        with (
            stop_on_sigterm(plan.results_dir),
            results_dir_lock(plan.results_dir) if plan.writer else contextlib.nullcontext(),
        ):
            if plan.writer:
                remove_temporaries(plan.results_dir)
            rows = [row for variant in plan.variants for row in ModelRun(plan, variant).rows()]
            table = summarise(pd.DataFrame(rows))
            if plan.writer:
                write_results(table, plan.results_dir)
        if plan.writer:
            print(f"\nZero-shot results (raw scores and maps), written to {plan.results_dir}:\n")
            print(to_markdown(table))
            print("\nFolders (settings.json, prompts.pt, rows, heat-maps):")
            for variant in plan.variants:
                print(f"  {variant.label}: {variant.folder(plan.results_dir)}")
        return table
