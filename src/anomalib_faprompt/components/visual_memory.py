"""A memory of normal patch features and its nearest-neighbour anomaly maps (few-shot references).

Shared by every method that scores patches against k normal reference images: WinCLIP+-style
references for AnomalyCLIP and FAPrompt, and PromptAD's visual branch, which is exactly this
computation (``S[i] = min_j (1 - M[i]·G[j]) / 2`` per layer, PromptAD's README, Method).

Example:
    >>> import torch
    >>> from anomalib_faprompt.components import VisualMemory
    >>> memory = VisualMemory()
    >>> references = torch.randn(2, 3, 49, 16)          # 2 layers, 3 normal images, 7x7 patches, width 16
    >>> memory.add(references)
    >>> memory.bank.shape                                  # layers, 3 * 49 patches, width
    torch.Size([2, 147, 16])
    >>> distances = memory(references[:, :1])             # a reference against the memory: distance 0
    >>> distances.shape, float(distances.abs().max()) < 1e-6
    (torch.Size([2, 1, 49]), True)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class VisualMemory(nn.Module):
    """Patch features of normal reference images, per layer; cosine nearest-neighbour distances.

    The memory is a buffer of shape ``(layers, references × patches, width)`` holding L2-normalised
    features. It is part of the module's ``state_dict`` (so prompt files and Lightning checkpoints keep
    it) and a constant in exported graphs. Its size grows linearly with the number of references:
    ``layers × k × patches × width × 4`` bytes in fp32 (:attr:`nbytes`).

    Args:
        chunk_size: Memory entries compared at once. Bounds the similarity matrix held in memory to
            ``batch × patches × chunk_size``; the result does not depend on it.
    """

    #: Buffers that are learned state: saved in prompt files (``PromptedCLIP.learned_state_names``).
    learned_buffers: ClassVar[tuple[str, ...]] = ("bank",)

    def __init__(self, chunk_size: int = 8192) -> None:
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            msg = f"VisualMemory: chunk_size must be a positive integer, got {chunk_size!r}."
            raise ValueError(msg)
        self.chunk_size = chunk_size
        self.register_buffer("bank", torch.empty(0, 0, 0))

    @property
    def is_empty(self) -> bool:
        """Whether no reference was added."""
        return self.bank.numel() == 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the memory."""
        return self.bank.numel() * self.bank.element_size()

    def reset(self) -> None:
        """Forget every reference."""
        self.bank = torch.empty(0, 0, 0, device=self.bank.device)

    @torch.no_grad()
    def add(self, features: torch.Tensor) -> None:
        """Add the patch features of reference images.

        Args:
            features: ``(layers, images, patches, width)``, not necessarily normalised.

        Raises:
            ValueError: When the shape differs from the references already stored, or values are not finite.
        """
        if features.dim() != 4:
            shape = tuple(features.shape)
            msg = f"VisualMemory.add expects (layers, images, patches, width) features, got shape {shape}."
            raise ValueError(msg)
        if not torch.isfinite(features).all():
            msg = "VisualMemory.add: the reference features are not finite; check the reference images."
            raise ValueError(msg)
        layers, _, _, width = features.shape
        entries = F.normalize(features.float(), dim=-1).reshape(layers, -1, width)
        if self.is_empty:
            self.bank = entries
            return
        if (layers, width) != (self.bank.shape[0], self.bank.shape[2]):
            msg = (
                f"VisualMemory.add: references of {layers} layers × width {width} cannot join a memory of "
                f"{self.bank.shape[0]} layers × width {self.bank.shape[2]}."
            )
            raise ValueError(msg)
        self.bank = torch.cat([self.bank, entries.to(self.bank.device)], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of every patch to its nearest reference patch, per layer.

        Args:
            features: ``(layers, batch, patches, width)`` patch features of the images to score.

        Returns:
            ``(layers, batch, patches)`` distances ``min_j (1 - cos(f, g_j)) / 2`` in [0, 1], fp32.

        Raises:
            RuntimeError: When the memory is empty.
        """
        if not torch.jit.is_tracing() and self.is_empty:  # an export traces a filled memory
            msg = "VisualMemory has no references: add the features of k normal images first (k_shot >= 1)."
            raise RuntimeError(msg)
        with torch.autocast(features.device.type, enabled=False):
            queries = F.normalize(features.float(), dim=-1)
            best = None
            for start in range(0, self.bank.shape[1], self.chunk_size):
                chunk = self.bank[:, start : start + self.chunk_size]
                similarity = torch.einsum("lbnc,lmc->lbnm", queries, chunk).amax(dim=-1)
                best = similarity if best is None else torch.maximum(best, similarity)
            return ((1 - best) / 2).clamp_min(0)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The memory's size depends on k and is only known from the saved state: take its shape from there.
        key = prefix + "bank"
        if key in state_dict:
            self.bank = torch.empty_like(state_dict[key], device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
