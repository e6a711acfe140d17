"""Values of the results tables: undefined metrics (NaN, ``n/a``, left out of means), rows marked as not zero-shot.

A category whose test split has only normal (or only anomalous) images, or no anomalous pixel in its masks, has no
AUROC, AP or AUPRO: torchmetrics would return 0.0 for them, and a table averaging that 0.0 in reports a number that
looks fine and is not. The evaluator reports them as NaN (naming the metric, the category and why in the log);
the tables keep them NaN, write them ``n/a`` and take each mean over the categories where the metric is defined,
counting them in ``<metric>_categories``.

With ``allow_overlap: true``, rows of targets that are also auxiliary categories of a model's prompts are marked
(:data:`OVERLAP`, ``(auxiliary)`` in ``results.md``).

Example:
    >>> percent(0.612, count=4, total=5), percent(float("nan")), percent(0.5, count=5, total=5)
    ('61.2 (4/5)', 'n/a', '50.0')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

#: Suffix of the columns counting the categories a metric was defined on (in a mean: that it was taken over).
COUNT_SUFFIX = "_categories"

UNDEFINED_NOTE = (
    "n/a: undefined on that category (its test split has no anomalous or no normal images, or its masks no "
    "anomalous pixel; the run's log says which). Means leave it out: 61.2 (4/5) is a mean over 4 of 5 categories "
    "(results.csv: <metric>_categories)."
)


#: Column marking rows of targets that are also auxiliary categories of the model's prompts (``allow_overlap``).
OVERLAP = "auxiliary_overlap"
OVERLAP_MARK = "(auxiliary)"
OVERLAP_NOTE = (
    f"{OVERLAP_MARK}: also an auxiliary category (allow_overlap: true). The prompts were learned on these images, so "
    "the row is not zero-shot; the model's mean includes it."
)


def count_column(metric: str) -> str:
    """The column counting the categories ``metric`` was defined on."""
    return f"{metric}{COUNT_SUFFIX}"


def defined_counts(rows: pd.DataFrame, metrics: Sequence[str]) -> dict[str, pd.Series]:
    """Per metric, its count column for category rows: 1 where the metric is defined, 0 where it is NaN."""
    return {count_column(name): rows[name].notna().astype(int) for name in metrics}


def rows_and_means(
    rows: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The category rows with their count columns, and their means per ``keys`` (``dataset``, ``category``: ``mean``).

    Each mean leaves undefined values out and counts the categories it was taken over; a mean with a row marked
    :data:`OVERLAP` is marked too.
    """
    if "notice" not in rows:
        rows = rows.assign(notice="")
    rows = rows.assign(**defined_counts(rows, metrics))
    aggregation = {**dict.fromkeys(metrics, "mean"), "notice": "first"}
    aggregation |= {count_column(name): "sum" for name in metrics}
    aggregation |= dict.fromkeys([OVERLAP] if OVERLAP in rows else [], "any")
    means = rows.groupby(list(keys), sort=False).agg(aggregation).reset_index()
    means["dataset"], means["category"] = "mean", "mean"
    return rows, means


def has_undefined(table: pd.DataFrame, metrics: Sequence[str]) -> bool:
    """Whether any value of ``metrics`` in ``table`` is undefined (NaN)."""
    return bool(table[list(metrics)].isna().to_numpy().any())


def percent(value: Any, count: Any = None, total: int | None = None) -> str:
    """A metric in percent with one decimal; ``n/a`` when undefined; ``(count/total)`` for a mean over fewer."""
    if value is None or pd.isna(value):
        return "n/a"
    text = f"{100 * value:.1f}"
    if total is not None and count is not None and not pd.isna(count) and int(count) < total:
        text += f" ({int(count)}/{total})"
    return text


def category_cell(row: dict[str, Any]) -> str:
    """A row's category for ``results.md``: marked :data:`OVERLAP_MARK` when it is also an auxiliary category."""
    return f"{row['category']} {OVERLAP_MARK}" if row.get(OVERLAP) is True else str(row["category"])


def has_overlap(table: pd.DataFrame) -> bool:
    """Whether any row of ``table`` is marked as an auxiliary category."""
    return OVERLAP in table and bool(table[OVERLAP].fillna(False).astype(bool).any())
