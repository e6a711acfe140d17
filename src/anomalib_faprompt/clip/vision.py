"""CLIP vision encoder with the dual-path DPAM forward (AnomalyCLIP and FAPrompt READMEs: Method).

The last ``dpam_layers`` blocks run two paths with the block's weights: the original Q-K
path and a V-V attention path that skips the MLP. Patch features are read from the V-V path
(``ln_post`` then ``proj``); the global feature is the original path's class token times
``proj`` without ``ln_post``, as in AnomalyCLIP's and FAPrompt's released code, or with it
(``global_ln_post=True``: CLIP's own image embedding, as PromptAD's VV-CLIP reads it).

PromptAD's VV-CLIP is the same dual path on every block (``dpam_layers`` = depth), and its
visual memory reads the original path's residual after attention, before the MLP
(:meth:`DPAMVisionEncoder.encode`'s ``residual_layers``; PromptAD README, Method).

Example:
    >>> import torch
    >>> from anomalib_faprompt.clip import DPAMVisionEncoder, build_clip
    >>> encoder = DPAMVisionEncoder(build_clip("ViT-B-16", pretrained=None).visual, dpam_layers=10)
    >>> image_features, patch_features = encoder(torch.randn(1, 3, 240, 240), feature_layers=(6, 12))
    >>> image_features.shape, patch_features[0].shape
    (torch.Size([1, 512]), torch.Size([1, 226, 512]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import merge_heads, self_attention, split_heads


@dataclass
class VisionFeatures:
    """What one pass of :class:`DPAMVisionEncoder` reads out; nothing is L2-normalised.

    Attributes:
        image_features: Global features (B, E).
        patch_features: Per feature layer, token features (B, 1 + N, E), class token first, projected.
        residual_features: Per residual layer, the original path's residual stream after the block's attention
            and before its MLP (B, 1 + N, width), not projected.
    """

    image_features: torch.Tensor
    patch_features: list[torch.Tensor]
    residual_features: list[torch.Tensor]


class DPAMVisionEncoder(nn.Module):
    """Frozen CLIP ViT with DPAM's V-V attention in its last blocks.

    Args:
        visual: open_clip ``VisionTransformer`` (class token, no attentional pooling).
        dpam_layers: Number of final blocks that run the V-V path.
        global_ln_post: Apply ``ln_post`` to the class token before ``proj`` (CLIP's own image embedding).
    """

    def __init__(self, visual: nn.Module, dpam_layers: int, global_ln_post: bool = False) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "class_embedding"):
            msg = "DPAM needs a CLIP ViT with a class token and no attentional pooling."
            raise ValueError(msg)
        depth = len(visual.transformer.resblocks)
        if not 0 < dpam_layers <= depth:
            msg = f"dpam_layers must be in 1..{depth} for this backbone, got {dpam_layers}."
            raise ValueError(msg)
        self.visual = visual
        self.dpam_layers = dpam_layers
        self.global_ln_post = global_ln_post
        self.depth = depth
        self.patch_size = visual.conv1.kernel_size[0]
        self.pretrained_grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)

    @property
    def first_dpam_block(self) -> int:
        """0-indexed position of the first block that runs the V-V path."""
        return self.depth - self.dpam_layers

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding for a patch grid, patch positions resized bilinearly if needed."""
        embedding = self.visual.positional_embedding
        if grid == (self.pretrained_grid, self.pretrained_grid):
            return embedding
        class_position, patch_positions = embedding[:1], embedding[1:]
        width = embedding.shape[-1]
        patch_positions = patch_positions.reshape(1, self.pretrained_grid, self.pretrained_grid, width)
        patch_positions = F.interpolate(
            patch_positions.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False
        )
        return torch.cat([class_position, patch_positions.permute(0, 2, 3, 1).reshape(-1, width)])

    def _dpam_block(
        self, block: nn.Module, x: torch.Tensor, x_vv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_heads(block, block.ln_1(x))
        # One fused call for both paths: queries (q; v) against keys (k; v), values v twice.
        attended = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
        attended = merge_heads(block, attended)
        # unbind, not chunk: chunk on a symbolic batch pins it in torch.export (dynamic-batch ONNX/OpenVINO).
        qk_out, vv_out = attended.unflatten(0, (2, -1)).unbind(0)
        after_attention = x + block.ls_1(qk_out)
        x = after_attention + block.ls_2(block.mlp(block.ln_2(after_attention)))
        return after_attention, x, x_vv + block.ls_1(vv_out)

    def forward(self, images: torch.Tensor, feature_layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode images: global features (B, E) and, per feature layer, token features (B, 1 + N, E).

        See :meth:`encode`, which also reads residual features.
        """
        features = self.encode(images, feature_layers)
        return features.image_features, features.patch_features

    def encode(
        self, images: torch.Tensor, feature_layers: Sequence[int], residual_layers: Sequence[int] = ()
    ) -> VisionFeatures:
        """Encode images.

        Args:
            images: Normalised images (B, 3, H, W), H and W multiples of the patch size.
            feature_layers: 1-indexed blocks whose patch features to return (V-V path in DPAM blocks).
            residual_layers: 1-indexed blocks whose original-path residual after attention to return.

        Returns:
            The global, patch and residual features (:class:`VisionFeatures`), none L2-normalised.
        """
        for name, layers in (("feature_layers", feature_layers), ("residual_layers", residual_layers)):
            if any(not 1 <= layer <= self.depth for layer in layers):
                msg = f"{name} must lie in 1..{self.depth} for this backbone, got {list(layers)}."
                raise ValueError(msg)
        chunk = self.cpu_micro_batch(images)
        if chunk >= images.shape[0]:
            return self._encode(images, feature_layers, residual_layers)
        parts = [self._encode(part, feature_layers, residual_layers) for part in images.split(chunk)]
        return VisionFeatures(
            image_features=torch.cat([part.image_features for part in parts]),
            patch_features=[torch.cat(layer) for layer in zip(*(part.patch_features for part in parts), strict=True)],
            residual_features=[
                torch.cat(layer) for layer in zip(*(part.residual_features for part in parts), strict=True)
            ],
        )

    #: Tokens per CPU micro-batch. On a CPU the element-wise work of a block (layer norms, GELU, residual adds,
    #: the copies that lay out heads) is memory-bound: while a batch's activations fit in the last-level cache it
    #: runs from cache, beyond it from DRAM. At ViT-B/16 and 512 px one image's MLP activations (1025 tokens ×
    #: 3072 × 4 bytes, 12.6 MB) fit a 32 MB L3, eight images' (101 MB) do not, and batch 8 cost 12 % more per
    #: image than batch 1 though its matrix products and attention cost the same per image. Micro-batches of
    #: about this many tokens keep batch ≥ 8 as cheap per image as batch 1 and still give small inputs (PromptAD's
    #: 226 tokens at 240 px) products tall enough to run at the matmul rate. GPUs take the batch whole.
    cpu_micro_batch_tokens: ClassVar[int] = 2048

    def cpu_micro_batch(self, images: torch.Tensor) -> int:
        """Images per micro-batch of :meth:`encode`: the whole batch on GPUs and in traced graphs, else by tokens."""
        if images.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return images.shape[0]
        tokens = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size) + 1
        return max(1, self.cpu_micro_batch_tokens // tokens)

    def _encode(
        self, images: torch.Tensor, feature_layers: Sequence[int], residual_layers: Sequence[int]
    ) -> VisionFeatures:
        visual = self.visual
        x = visual.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([class_token, x], dim=1) + self.position_embedding(grid).to(x.dtype)
        x = visual.ln_pre(x)

        wanted, wanted_residuals = set(feature_layers), set(residual_layers)
        collected: dict[int, torch.Tensor] = {}
        residuals: dict[int, torch.Tensor] = {}
        x_vv = None
        for index, block in enumerate(visual.transformer.resblocks):
            if index < self.first_dpam_block:
                after_attention = x + block.ls_1(self_attention(block, block.ln_1(x)))
                x = after_attention + block.ls_2(block.mlp(block.ln_2(after_attention)))
            else:
                x_vv = x if x_vv is None else x_vv
                after_attention, x, x_vv = self._dpam_block(block, x, x_vv)
            if index + 1 in wanted:
                collected[index + 1] = x_vv if x_vv is not None else x
            if index + 1 in wanted_residuals:
                residuals[index + 1] = after_attention
        class_token = visual.ln_post(x[:, 0]) if self.global_ln_post else x[:, 0]
        return VisionFeatures(
            image_features=class_token @ visual.proj,
            patch_features=[visual.ln_post(collected[layer]) @ visual.proj for layer in feature_layers],
            residual_features=[residuals[layer] for layer in residual_layers],
        )
