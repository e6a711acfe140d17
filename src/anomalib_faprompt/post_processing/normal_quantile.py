"""A threshold from normal values only: the order statistic that flags a chosen share of new normal values.

With ``N`` normal images scored, a threshold at one of their scores flags a *new* normal image (one scored
later, exchangeable with them) with a probability that is itself random: with ``a`` of the ``N`` scores above the
threshold it follows ``Beta(a + 1, N - a)``, mean ``(a + 1) / (N + 1)``, whatever the distribution of the scores
(order statistics of exchangeable continuous values). :class:`NormalQuantile` picks the largest ``a`` whose mean
stays at or below the asked rate, so the threshold is not optimistic: taking the plain ``1 - fpr`` quantile of the
``N`` scores would flag about ``(fpr·N + 1) / (N + 1)``, twice the asked 1 % with 100 images. It needs
``N + 1 >= 1 / fpr`` images (99 for 1 %), and states the 95 % interval of the rate and of the count among ``m`` new
images (beta-binomial). Pixels of one image are not independent: for maps the share is only that of the
calibration pixels.

Example:
    >>> import torch
    >>> scores = torch.arange(199, dtype=torch.float32)  # 199 normal scores 0..198
    >>> quantile = NormalQuantile.of(scores, fpr=0.01, what="normal image scores")
    >>> quantile.value, quantile.above, quantile.expected_rate
    (197.0, 1, 0.01)
    >>> NormalQuantile.of(scores[:20], fpr=0.01, what="normal image scores")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: normal_fpr=0.01 needs at least 99 normal image scores (...); 20 were given. ... at least 0.0477.
"""

from __future__ import annotations

import dataclasses
import math

import torch

#: Coverage of the intervals stated with a threshold.
INTERVAL_LEVEL = 0.95


def check_rate(name: str, value: object) -> float:
    """``value`` as a rate strictly between 0 and 1.

    Raises:
        ValueError: Naming the setting and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        msg = (
            f"{name} must be a false-positive rate strictly between 0 and 1 (e.g. 0.01 flags 1 % of normal images), "
            f"got {value!r}."
        )
        raise ValueError(msg)
    return float(value)


def minimum_count(fpr: float) -> int:
    """The fewest normal values from which a threshold at rate ``fpr`` can be set (``N + 1 >= 1 / fpr``)."""
    return max(1, math.ceil(1.0 / fpr - 1.0 - 1e-9))


@dataclasses.dataclass(frozen=True)
class NormalQuantile:
    """A threshold at one of ``count`` normal values, with ``above`` of them strictly above it."""

    #: The threshold: values strictly above it are flagged.
    value: float
    #: Normal values it was set from.
    count: int
    #: How many of them lie above it.
    above: int

    @classmethod
    def of(cls, values: torch.Tensor, fpr: float, what: str, setting: str = "normal_fpr") -> NormalQuantile:
        """The threshold that flags a new normal value with probability ``fpr`` on average, or less.

        Args:
            values: Normal values (any shape; flattened), finite.
            fpr: The asked false-positive rate.
            what: What the values are, for messages ("normal image scores").
            setting: The setting that asked for ``fpr``, for messages.

        Raises:
            ValueError: If there are too few values for ``fpr``, naming both numbers and the smallest rate possible.
        """
        flat = values.detach().flatten().to(torch.float64).cpu()
        count = flat.numel()
        cls.check_count(count, fpr, what, setting)
        above = math.floor(fpr * (count + 1) + 1e-9) - 1
        value = torch.kthvalue(flat, count - above).values.item()
        return cls(value=float(value), count=count, above=above)

    @staticmethod
    def check_count(count: int, fpr: float, what: str, setting: str = "normal_fpr") -> None:
        """Refuse fewer than :func:`minimum_count` values for ``fpr``, naming both numbers and the smallest rate.

        Raises:
            ValueError: If ``count`` is too small.
        """
        if count >= minimum_count(fpr):
            return
        smallest = 1.0 / (count + 1)
        msg = (
            f"{setting}={fpr:g} needs at least {minimum_count(fpr)} {what} (a threshold from N of them flags a new "
            f"normal one with probability 1/(N+1) or more); {count} were given. Give more normal images, or a "
            f"{setting} of at least {math.ceil(smallest * 1e4) / 1e4:g}."
        )
        raise ValueError(msg)

    @property
    def expected_rate(self) -> float:
        """The mean probability that a new normal value lies above the threshold, ``(above + 1) / (count + 1)``."""
        return (self.above + 1) / (self.count + 1)

    def rate_interval(self, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
        """The central ``level`` interval of that probability (its law is ``Beta(above + 1, count - above)``)."""
        from scipy.stats import beta

        law = beta(self.above + 1, self.count - self.above)
        return float(law.ppf((1 - level) / 2)), float(law.ppf((1 + level) / 2))

    def count_interval(self, new: int, level: float = INTERVAL_LEVEL) -> tuple[int, int]:
        """The central ``level`` interval of how many of ``new`` new normal values lie above the threshold."""
        from scipy.stats import betabinom

        law = betabinom(new, self.above + 1, self.count - self.above)
        return int(law.ppf((1 - level) / 2)), int(law.ppf((1 + level) / 2))
