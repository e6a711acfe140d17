"""Data for the zero-shot protocol: auxiliary training datamodule, synthetic categories, input checks."""

from .auxiliary import AuxiliaryDataModule
from .references import sample_normal_references
from .synthetic import CATEGORIES, DEFECTS, SyntheticAD, generate_synthetic_dataset
from .validation import DataValidationError, validate_samples

__all__ = [
    "CATEGORIES",
    "DEFECTS",
    "AuxiliaryDataModule",
    "DataValidationError",
    "SyntheticAD",
    "generate_synthetic_dataset",
    "sample_normal_references",
    "validate_samples",
]
