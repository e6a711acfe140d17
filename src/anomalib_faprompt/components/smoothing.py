"""Gaussian smoothing of anomaly maps, numerically equal to ``scipy.ndimage.gaussian_filter``.

The released code smooths with scipy (``mode="reflect"``, ``truncate=4``); this is the same
filter as a separable convolution in torch, so it runs batched, on GPU and inside exports.

Example:
    >>> import torch
    >>> smoothing = GaussianSmoothing(sigma=4.0)
    >>> smoothing(torch.rand(2, 64, 64)).shape
    torch.Size([2, 64, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_faprompt.clip.settings import check_float


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad by mirroring with the edge sample repeated (scipy's ``reflect``)."""
    size = x.shape[dim]
    if radius > size:
        msg = f"Gaussian smoothing radius {radius} exceeds the map size {size}; lower sigma or enlarge the input."
        raise ValueError(msg)
    head = x.narrow(dim, 0, radius).flip(dim)
    tail = x.narrow(dim, size - radius, radius).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of (B, H, W) maps; ``sigma=0`` is the identity.

    Args:
        sigma: Standard deviation in pixels, finite and >= 0.
        truncate: Kernel radius in standard deviations (scipy's default 4).
        max_size: Smallest map side the filter will see, if known (the models' ``image_size``): a
            kernel wider than the map is refused here rather than at the first forward.

    Raises:
        ValueError: If ``sigma`` or ``truncate`` is negative or not finite, or the kernel exceeds ``max_size``.
    """

    def __init__(self, sigma: float, truncate: float = 4.0, max_size: int | None = None) -> None:
        super().__init__()
        truncate = check_float("truncate", truncate, low_open=True, why="kernel radius in standard deviations")
        why = "in pixels; 0 disables smoothing"
        if max_size is not None:
            why += f"; the kernel, {truncate:g} sigma each side, must fit the {max_size} px map"
        high = None if max_size is None else max_size / truncate
        self.sigma = check_float("sigma", sigma, high=high, why=why)
        self.radius = int(truncate * self.sigma + 0.5) if self.sigma > 0 else 0
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / max(self.sigma, 1e-12)) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth maps of shape (B, H, W)."""
        if self.radius == 0:
            return maps
        with torch.autocast(maps.device.type, enabled=False):
            kernel = self.kernel.float()
            x = maps.float().unsqueeze(1)
            x = F.conv2d(_symmetric_pad(x, self.radius, dim=3), kernel.view(1, 1, 1, -1))
            x = F.conv2d(_symmetric_pad(x, self.radius, dim=2), kernel.view(1, 1, -1, 1))
            return x.squeeze(1)
