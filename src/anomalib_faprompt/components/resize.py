"""Antialiased bicubic resizing that exports: the same pixels in torch, ONNX Runtime and OpenVINO.

The models' pre-processor resizes images with torchvision's ``Resize(..., BICUBIC, antialias=True)`` (PIL's
filter, a = -0.5, widened by the scale when shrinking). anomalib's export drops the antialiasing (ONNX had none
before opset 18), so an exported model saw other pixels than ``anomalib predict`` on any image not already at the
model's size: scores moved by up to 0.03 on full-size images. ONNX's antialiased ``Resize`` runs in ONNX Runtime,
but OpenVINO's reading of it gives other values (up to 0.65 apart on [0, 1] pixels). :class:`AntialiasedBicubicResize`
computes the same filter as two matrix products whose weights are built in the graph from the input's size, so
every runtime computes the same thing, for any input size (to 2e-5 of torchvision's in f32).

Example:
    >>> import torch
    >>> from torchvision.transforms.v2 import InterpolationMode, Resize
    >>> image = torch.rand(1, 3, 500, 700)
    >>> reference = Resize((224, 224), interpolation=InterpolationMode.BICUBIC, antialias=True)(image)
    >>> float((AntialiasedBicubicResize((224, 224))(image) - reference).abs().max()) < 1e-5
    True
"""

from __future__ import annotations

import torch
from torch import nn

#: The cubic filter's coefficient of antialiased resizing (PIL's and torch's ``_upsample_bicubic2d_aa``).
CUBIC_A = -0.5
#: Samples of the filter per unit of its argument in :func:`filter_table` (linear interpolation between them is
#: exact to 4e-8).
TABLE_STEPS = 4096


def cubic(x: torch.Tensor) -> torch.Tensor:
    """The cubic filter of antialiased resizing (a = -0.5), zero from |x| = 2 on."""
    x = x.abs()
    near = ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * CUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def filter_table() -> torch.Tensor:
    """:func:`cubic` at ``0, 1/TABLE_STEPS, ..., 2 + 1/TABLE_STEPS`` (float32, computed in float64)."""
    return cubic(torch.arange(2 * TABLE_STEPS + 2, dtype=torch.float64) / TABLE_STEPS).float()


def resize_weights(in_size: int | torch.SymInt, out_size: int, table: torch.Tensor) -> torch.Tensor:
    """The (out_size, in_size) matrix of antialiased bicubic resampling along one axis (rows sum to 1).

    Output pixel ``i`` is centred on input position ``(i + 0.5) · scale`` with ``scale = in / out``; when
    shrinking, the filter widens by ``scale`` (that is the antialiasing). As torch's kernel, each row covers the
    input pixels ``floor(centre ± support + 0.5)`` clipped to the image, and is normalised to sum 1.

    Why integers and a table: a runtime that stores float activations in bf16 (OpenVINO's default on CPUs with
    AVX512-BF16 or AMX) keeps 8 significant bits, so positions computed in floats (hundreds of pixels) and the
    filter evaluated on them would be off by several percent. Here the filter's argument
    ``(j + 0.5 - centre) / stretch = ((2j + 1) · out - (2i + 1) · in) / (2 · max(in, out))`` is an exact integer
    ratio, the window's bounds are integer divisions, and the filter's value is read from ``table``
    (:func:`filter_table`, a constant) by integer index, interpolated linearly: the weights are then exact in f32
    and rounded only once in bf16, as a constant's would be. ``torch.floor_divide`` exports to ONNX's integer
    ``Div``; ``torch.div(..., rounding_mode=...)`` would go through floats, and so through bf16 in OpenVINO
    (integers above 256 are not exact there). Measured on an AMX CPU (OpenVINO's bf16 default against f32):
    resizing 500×700 images to 224 moves pixels by up to 0.007, as OpenVINO's own non-antialiased ``Interpolate``
    does (0.006); with float positions it was 0.1.
    """
    rows = torch.arange(out_size, device=table.device)
    columns = torch.arange(in_size, device=table.device)
    larger = torch.sym_max(in_size, out_size)
    centres = (2 * rows + 1) * in_size  # 2 · out · centre
    first = torch.clamp(torch.floor_divide(centres + out_size - 4 * larger, 2 * out_size), min=0)
    last = torch.clamp(torch.floor_divide(centres + out_size + 4 * larger, 2 * out_size), max=in_size)
    inside = (columns[None] >= first[:, None]) & (columns[None] < last[:, None])
    # 2 · max(in, out) · |argument|, clamped to the filter's support (beyond it the weight is 0): small integers.
    distances = torch.clamp(((2 * columns[None] + 1) * out_size - centres[:, None]).abs(), max=4 * larger)
    steps = distances * TABLE_STEPS
    index = torch.floor_divide(steps, 2 * larger)
    fraction = (steps - index * 2 * larger).float() / (2 * larger)
    below, above = table[index], table[index + 1]
    weights = (below + fraction * (above - below)) * inside
    return weights / weights.sum(dim=1, keepdim=True)


class AntialiasedBicubicResize(nn.Module):
    """Resize (B, C, H, W) images to ``size`` as torchvision's antialiased bicubic ``Resize`` does, exportably.

    Args:
        size: Output (height, width).
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.register_buffer("table", filter_table(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize along height, then width (two matrix products, float32)."""
        height, width = images.shape[-2], images.shape[-1]
        table = self.table.to(images.device)
        rows = resize_weights(height, self.size[0], table)
        columns = resize_weights(width, self.size[1], table)
        resized = torch.matmul(rows, images.float())
        resized = torch.matmul(resized, columns.transpose(0, 1))
        return resized.to(images.dtype)

    def extra_repr(self) -> str:
        """The output size, in the module's repr."""
        return f"size={self.size}"
