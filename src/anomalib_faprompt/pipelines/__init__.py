"""Pipelines: the zero-shot protocol (``anomalib zero_shot``)."""

from .zero_shot import ZeroShot, zero_shot_evaluator

__all__ = ["ZeroShot", "zero_shot_evaluator"]
