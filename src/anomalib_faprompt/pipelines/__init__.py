"""Pipelines: the zero-shot protocol (``anomalib zero_shot``)."""

from .zero_shot import ZeroShot

__all__ = ["ZeroShot"]
