"""Data for the zero-shot protocol: auxiliary training datamodule, synthetic categories, input checks."""

from .auxiliary import AuxiliaryDataModule
from .synthetic import CATEGORIES, DEFECTS, SyntheticAD, generate_synthetic_dataset
from .validation import DataValidationError, validate_samples

__all__ = [
    "CATEGORIES",
    "DEFECTS",
    "AuxiliaryDataModule",
    "DataValidationError",
    "SyntheticAD",
    "generate_synthetic_dataset",
    "validate_samples",
]
