"""PromptAD (CVPR 2024): few-shot prompt learning from normal images only, with a visual memory.

Example:
    >>> from anomalib_faprompt.models.promptad import PromptAD
    >>> PromptAD.method_name
    'PromptAD'
"""

from .lightning_model import PromptAD

__all__ = ["PromptAD"]
