"""Fused multi-head attention on the weights of open_clip's ``ResidualAttentionBlock``.

open_clip's blocks hold a ``torch.nn.MultiheadAttention``; these helpers run its projections
around :func:`torch.nn.functional.scaled_dot_product_attention`, which both the Q-K path and
the V-V path of DPAM use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x`` (B, L, D) with the block's shared QKV weights; returns q, k, v as (B, H, L, D/H)."""
    attn: nn.MultiheadAttention = block.attn
    batch, length, width = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, length, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Merge heads (B, H, L, D/H) -> (B, L, D) and apply the block's output projection."""
    batch, heads, length, head_dim = x.shape
    x = x.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return block.attn.out_proj(x)


def self_attention(block: nn.Module, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """Ordinary (Q-K) self-attention of a block on an already layer-normed input."""
    q, k, v = split_heads(block, x)
    return merge_heads(block, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


def residual_block(block: nn.Module, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """An ordinary pre-norm transformer block (attention + MLP, both residual)."""
    x = x + block.ls_1(self_attention(block, block.ln_1(x), is_causal=is_causal))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
