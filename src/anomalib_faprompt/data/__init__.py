"""Data for the zero-shot protocol: auxiliary training datamodule and synthetic categories."""

from .auxiliary import AuxiliaryDataModule
from .synthetic import CATEGORIES, DEFECTS, generate_synthetic_dataset

__all__ = ["CATEGORIES", "DEFECTS", "AuxiliaryDataModule", "generate_synthetic_dataset"]
