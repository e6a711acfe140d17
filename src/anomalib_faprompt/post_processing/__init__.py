"""Post-processing: thresholds from normal images only (:class:`NormalFPRPostProcessor`), for any anomalib model."""

from .normal_fpr import NormalFPRPostProcessor
from .normal_quantile import NormalQuantile

__all__ = ["NormalFPRPostProcessor", "NormalQuantile"]
