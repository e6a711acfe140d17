"""The ``zero_shot`` results table and its files: ``results.csv``, ``results.md`` and ``results.png``.

Per model, one row per target category and a ``mean`` row over the categories (a few-shot run gives the table of
:mod:`~anomalib_faprompt.pipelines.few_shot_table`). A metric that is undefined on a category (its test split has
no anomalous or no normal images, or its masks no anomalous pixel) is NaN there, shown as ``n/a``, and left out
of the mean; each metric's ``<metric>_categories`` column counts the categories it was defined on (1 or 0 on a
category row, the number the mean was taken over on a ``mean`` row), and ``results.md`` writes a mean taken over
fewer than all categories as ``61.2 (4/5)``.

Example:
    >>> import pandas as pd
    >>> rows = pd.DataFrame({"model": "M", "dataset": "D", "category": ["a", "b"], "image_AUROC": [0.8, float("nan")],
    ...                      "image_AP": 0.9, "pixel_AUROC": 0.7, "pixel_AUPRO": 0.5, "notice": ""})
    >>> mean = summarise(rows).iloc[-1]
    >>> mean.category, float(mean.image_AUROC), int(mean.image_AUROC_categories)
    ('mean', 0.8, 1)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from anomalib_faprompt.components.metrics import PAPER_METRICS

from .few_shot_table import few_shot_markdown, is_few_shot, plot_few_shot, summarise_few_shot
from .result_files import atomic_write
from .table_values import (
    OVERLAP,
    OVERLAP_NOTE,
    UNDEFINED_NOTE,
    category_cell,
    count_column,
    has_overlap,
    has_undefined,
    percent,
    rows_and_means,
)

METRICS = PAPER_METRICS

UNTRAINED_WEIGHTS_NOTE = (
    "Untrained weights: these models' numbers show the pipeline working, not the methods' accuracy."
)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-category rows plus, per model, the mean over the target categories; ``notice`` names untrained weights.

    Undefined (NaN) values are left out of the means; ``<metric>_categories`` says how many categories entered
    each. Rows of a few-shot run (k > 0) give the few-shot table instead: mean ± std over the samplings per model,
    category and k (:func:`~anomalib_faprompt.pipelines.few_shot_table.summarise_few_shot`).
    """
    if is_few_shot(rows):
        return summarise_few_shot(rows, METRICS)
    rows, means = rows_and_means(rows, METRICS, ["model"])
    marked = [OVERLAP] if OVERLAP in rows else []
    columns = ["model", "dataset", "category", *METRICS, "notice", *(count_column(name) for name in METRICS)]
    return pd.concat([rows, means], ignore_index=True)[columns + marked]


def notices(table: pd.DataFrame) -> list[str]:
    """``"<model>: <notice>"`` for each model whose weights are untrained, in table order."""
    if "notice" not in table:
        return []
    named = table.drop_duplicates("model").fillna({"notice": ""})
    return [f"{row.model}: {row.notice}" for row in named.itertuples(index=False) if row.notice]


def _zero_shot_markdown(table: pd.DataFrame) -> list[str]:
    lines = ["| model | dataset | category | " + " | ".join(METRICS) + " |", "|" + "---|" * (3 + len(METRICS))]
    categories = table[table.category != "mean"].groupby("model", sort=False).size()
    for row in table.to_dict("records"):
        total = int(categories.get(row["model"], 0)) if row["category"] == "mean" else None
        values = " | ".join(percent(row[name], row.get(count_column(name)), total) for name in METRICS)
        lines.append(f"| {row['model']} | {row['dataset']} | {category_cell(row)} | {values} |")
    return lines


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table with metrics in percent, followed by the models with untrained weights, if any.

    A few-shot table has a ``k`` column and ``mean ± std`` (over the samplings) values for k > 0. Undefined values
    read ``n/a``, with a note below the table.
    """
    lines = few_shot_markdown(table, METRICS) if is_few_shot(table) else _zero_shot_markdown(table)
    if has_undefined(table, METRICS):
        lines += ["", UNDEFINED_NOTE]
    if has_overlap(table):
        lines += ["", OVERLAP_NOTE]
    if noted := notices(table):
        lines += ["", UNTRAINED_WEIGHTS_NOTE, *(f"- {note}" for note in noted)]
    return "\n".join(lines)


def results_figure(table: pd.DataFrame) -> Figure:
    """Bar chart of each model's means, with AUROC's chance level (50 %) and the models with untrained weights.

    A few-shot table gives one panel per metric instead: each model's mean against k, with ± std bars.

    Example:
        >>> results_figure(table).savefig("results.png")  # doctest: +SKIP
    """
    noted = notices(table)
    few_shot = is_few_shot(table)
    figure = Figure(figsize=(16 if few_shot else 9.5, 4 + 0.2 * (len(noted) + 1) * bool(noted)))
    if few_shot:
        plot_few_shot(figure, table, METRICS)
    else:
        axes = figure.add_subplot()
        means = table[table.category == "mean"].set_index("model")[list(METRICS)] * 100
        means.T.plot.bar(ax=axes, rot=0, ylim=(0, 100), ylabel="%", title="Zero-shot, mean over targets")
        axes.axhline(50, color="0.3", linestyle="--", linewidth=1, label="AUROC chance level (50 %)")
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    bottom = 0.0
    if noted:
        lines = [UNTRAINED_WEIGHTS_NOTE, *noted]
        bottom = (0.2 * len(lines) + 0.1) / figure.get_figheight()
        figure.text(0.01, 0.01, "\n".join(lines), fontsize=8, color="darkred", va="bottom")
    figure.tight_layout(rect=(0, bottom, 0.88 if few_shot else 1, 0.95 if few_shot else 1))
    return figure


def write_results(table: pd.DataFrame, results_dir: Path) -> None:
    """Write ``results.csv``, ``results.md`` and the chart of the means, ``results.png`` (each atomically)."""
    markdown = to_markdown(table) + "\n"
    atomic_write(results_dir / "results.csv", lambda path: table.to_csv(path, index=False))
    atomic_write(results_dir / "results.md", lambda path: path.write_text(markdown, encoding="utf-8"))
    figure = results_figure(table)
    atomic_write(results_dir / "results.png", lambda path: figure.savefig(path, dpi=120, format="png"))
