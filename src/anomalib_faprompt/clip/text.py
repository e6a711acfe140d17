"""CLIP text encoder with learnable (deep) prompts (AnomalyCLIP and FAPrompt READMEs: Method).

Prompt token embeddings are a template's word embeddings in which learnable context vectors
replace placeholder words. Deep prompts replace token positions ``1..text_n_ctx`` before text
blocks ``2..text_depth``. Sequences are cut after the longest EOT position: the causal mask
makes the EOT feature independent of what follows it.

Example:
    >>> import torch
    >>> from anomalib_faprompt.clip import PromptedTextEncoder, build_clip
    >>> encoder = PromptedTextEncoder(build_clip("ViT-B-16", pretrained=None), "ViT-B-16")
    >>> template = encoder.template("X X X X damaged object.", n_ctx=4)
    >>> context = torch.zeros(4, encoder.width)
    >>> encoder(*template.fill(context)).shape
    torch.Size([1, 512])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .attention import residual_block
from .loading import build_tokenizer


class PromptTemplate(nn.Module):
    """Frozen word embeddings of one or more tokenised templates around a learnable context.

    The context occupies token positions ``1 .. n_ctx`` (right after SOT); the embeddings of
    the template's other words are buffers, derived from the tokenizer and CLIP's word
    embedding, and are therefore not stored in checkpoints.

    Args:
        prefix: SOT embedding (P, 1, T).
        suffix: Embeddings after the context (P, L - 1 - n_ctx, T).
        eot_positions: Index of the EOT token of each template (P,).
    """

    def __init__(self, prefix: torch.Tensor, suffix: torch.Tensor, eot_positions: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("prefix", prefix, persistent=False)
        self.register_buffer("suffix", suffix, persistent=False)
        self.register_buffer("eot_positions", eot_positions, persistent=False)
        #: Cut length covering every template's EOT, a Python int so that it stays static under torch.export.
        self.length = int(eot_positions.max()) + 1

    def fill(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert contexts (..., n_ctx, T) into the templates (P templates broadcast against the last leading dim).

        Returns:
            Prompt embeddings flattened to (prod(leading), L, T) and their EOT positions (prod(leading),).
        """
        context = context[None] if context.dim() == 2 else context
        leading = context.shape[:-2]
        prefix = torch.broadcast_to(self.prefix, (*leading, *self.prefix.shape[-2:]))
        suffix = torch.broadcast_to(self.suffix, (*leading, *self.suffix.shape[-2:]))
        embeddings = torch.cat([prefix, context, suffix], dim=-2)
        eot_positions = torch.broadcast_to(self.eot_positions, leading).reshape(-1)
        return embeddings.reshape(-1, *embeddings.shape[-2:]), eot_positions


class PromptedTextEncoder(nn.Module):
    """Frozen CLIP text transformer that encodes prompt embeddings with deep prompts.

    Args:
        clip: open_clip ``CLIP`` model (its text tower is used).
        backbone: Backbone name or config path (selects the tokenizer).
    """

    def __init__(self, clip: nn.Module, backbone: str | Path) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.resblocks = clip.transformer.resblocks
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.context_length = clip.positional_embedding.shape[0]
        self.width = clip.token_embedding.embedding_dim
        self.depth = len(self.resblocks)
        self.tokenizer = build_tokenizer(backbone, self.context_length)

    def template(self, texts: str | Sequence[str], n_ctx: int) -> PromptTemplate:
        """Tokenise templates whose first ``n_ctx`` words are placeholders for the context."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenizer(texts).to(self.token_embedding.weight.device)
        with torch.no_grad():
            embeddings = self.token_embedding(tokens).float()
        return PromptTemplate(embeddings[:, :1], embeddings[:, 1 + n_ctx :], tokens.argmax(dim=-1))

    def forward(
        self,
        embeddings: torch.Tensor,
        eot_positions: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] = (),
        length: int | None = None,
    ) -> torch.Tensor:
        """Encode prompt embeddings (N, L, T); returns the projected EOT features (N, E), not normalised.

        Args:
            embeddings: Token embeddings of the prompts (without positions).
            eot_positions: EOT index of each prompt (N,).
            deep_prompts: Matrices (n, T) that replace positions ``1..n`` before blocks 2, 3, ...
            length: Cut length (> every EOT position), e.g. ``PromptTemplate.length``; computed from
                ``eot_positions`` when ``None``, which torch.export cannot do (the value is data-dependent).
        """
        # Python int: the cut length must be static for tracing/export, and every prompt's EOT fits.
        length = int(eot_positions.max()) + 1 if length is None else length
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        for index, block in enumerate(self.resblocks):
            if 1 <= index <= len(deep_prompts):
                deep = deep_prompts[index - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + deep.shape[1] :]], dim=1)
            x = residual_block(block, x, is_causal=True)
        x = self.ln_final(x)
        eot_features = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        return eot_features @ self.text_projection
