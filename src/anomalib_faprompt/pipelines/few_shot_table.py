"""The few-shot protocol's table: per model, category and k, the mean ± std of each metric over the samplings.

The rows of a run (one per model, category, k and sampling) become, per model and k, one row per target category
(mean and standard deviation over the samplings) and one ``mean`` row: the mean over categories of each
sampling, then the mean and standard deviation of those over the samplings, as the papers average a run over
categories before reporting its spread. Standard deviations are the population's (``ddof=0``, numpy's default)
of the samplings drawn; they are empty where there is one sampling (k = 0).

Columns: ``model, dataset, category, k, samplings``, then each metric and its ``<metric>_std``, then ``notice``.

Example:
    >>> rows = pd.DataFrame({"model": "M", "dataset": "D", "category": "c", "k": [1, 1], "sampling": [0, 1],
    ...                      "image_AUROC": [0.6, 0.8], "notice": ""})
    >>> summarise_few_shot(rows, ["image_AUROC"])[["category", "image_AUROC", "image_AUROC_std"]].round(3)
      category  image_AUROC  image_AUROC_std
    0        c          0.7              0.1
    1     mean          0.7              0.1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .table_values import OVERLAP, category_cell, count_column, percent, rows_and_means

#: Delta degrees of freedom of the standard deviations over samplings (0: the population's, numpy's default).
STD_DDOF = 0


def is_few_shot(rows: pd.DataFrame) -> bool:
    """Whether rows come from a run with k > 0 (otherwise the zero-shot table is written, as before)."""
    return "k" in rows and bool((rows["k"] > 0).any())


def _spread(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    grouped = rows.groupby(["model", "k", "dataset", "category"], sort=False)
    std = grouped[list(metrics)].std(ddof=STD_DDOF).rename(columns=lambda name: f"{name}_std")
    # The categories a metric is defined on depend on the test split, not on the references: the same in every
    # sampling (the maximum also holds if one sampling alone were undefined).
    counts = grouped[[count_column(name) for name in metrics] + [OVERLAP] * (OVERLAP in rows)].max()
    spread = pd.concat(
        [grouped[list(metrics)].mean(), std, grouped.size().rename("samplings"), grouped["notice"].first(), counts],
        axis=1,
    ).reset_index()
    spread.loc[spread.samplings == 1, list(std.columns)] = np.nan
    return spread


def summarise_few_shot(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The table of a few-shot run from its rows (``model, dataset, category, k, sampling``, metrics, ``notice``).

    Undefined (NaN) values are left out of every mean; ``<metric>_categories`` counts the categories that entered
    it (:mod:`~anomalib_faprompt.pipelines.table_values`).
    """
    rows, means = rows_and_means(rows, metrics, ["model", "k", "sampling"])
    marked = [OVERLAP] if OVERLAP in rows else []
    table = pd.concat([_spread(rows, metrics), _spread(means, metrics)], ignore_index=True)
    columns = [column for name in metrics for column in (name, f"{name}_std")]
    counts = [count_column(name) for name in metrics]
    return table[["model", "dataset", "category", "k", "samplings", *columns, "notice", *counts, *marked]]


def _percent(mean: float, std: float, count: Any, total: int | None) -> str:
    text = percent(mean, count, total)
    return text if np.isnan(std) or text == "n/a" else f"{text} ± {100 * std:.1f}"


def few_shot_markdown(table: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Markdown lines: metrics in percent as ``mean ± std`` (over the samplings) for k > 0, then what they mean."""
    lines = ["| model | dataset | category | k | " + " | ".join(metrics) + " |", "|" + "---|" * (4 + len(metrics))]
    categories = table[table.category != "mean"].groupby(["model", "k"], sort=False).size()
    for row in table.to_dict("records"):
        total = int(categories.get((row["model"], row["k"]), 0)) if row["category"] == "mean" else None
        values = " | ".join(
            _percent(row[name], row[f"{name}_std"], row.get(count_column(name)), total) for name in metrics
        )
        lines.append(f"| {row['model']} | {row['dataset']} | {category_cell(row)} | {row['k']} | {values} |")
    samplings = int(table.samplings.max())
    return [
        *lines,
        "",
        f"k: normal reference images per category. k > 0: mean ± std over {samplings} samplings of the references "
        f"(population std, ddof={STD_DDOF}); sampling s draws them with seed + s, the same images for every model. "
        f"k = 0: zero-shot; one-class baselines (e.g. Patchcore) are fitted on the whole train split there.",
    ]


def plot_few_shot(figure: Figure, table: pd.DataFrame, metrics: Sequence[str]) -> None:
    """One panel per metric: each model's mean over categories against k, with ± std bars; AUROC's chance level."""
    means = table[table.category == "mean"]
    ks = sorted(means.k.unique())
    for position, name in enumerate(metrics, start=1):
        axes = figure.add_subplot(1, len(metrics), position)
        for model, rows in means.groupby("model", sort=False):
            axes.errorbar(rows.k, 100 * rows[name], yerr=100 * rows[f"{name}_std"].fillna(0), marker="o",
                          capsize=3, label=model)  # fmt: skip
        if "AUROC" in name:
            axes.axhline(50, color="0.3", linestyle="--", linewidth=1, label="AUROC chance level (50 %)")
        axes.set(title=name, xlabel="k (normal references)", xticks=ks, ylim=(0, 100), ylabel="%" * (position == 1))
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", fontsize=8)
    figure.suptitle("Few-shot, mean over targets (± std over samplings)", x=0.01, ha="left")
