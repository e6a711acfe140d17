"""Compiled inference of the frozen vision encoder: ``torch.compile``, with CUDA graphs on GPUs.

The vision encoder holds nearly all of a forward's FLOPs and, at inference, sees static shapes (one image
size, a few batch sizes), which is what CUDA graphs and inductor's fused kernels need. At one image per call a
GPU otherwise waits on Python and on hundreds of kernel launches. Training and export stay eager: training
steps are a fraction of the runs, and ``torch.export`` traces the eager module.

Modes are ``torch.compile``'s: ``"default"`` (fused kernels), ``"reduce-overhead"`` (plus CUDA graphs on
GPUs: the batch-1 latency mode), ``"max-autotune"`` (plus kernel autotuning; slow warm-up),
``"max-autotune-no-cudagraphs"``. Each new input shape, dtype or autocast state compiles once; that warm-up is
logged and kept in :attr:`CompiledVision.warmup_seconds`.

Example:
    >>> import torch
    >>> from anomalib_faprompt.clip import DPAMVisionEncoder, build_clip
    >>> from anomalib_faprompt.clip.compiled import CompiledVision
    >>> encoder = DPAMVisionEncoder(build_clip("ViT-B-16", pretrained=None).visual, dpam_layers=10).eval()
    >>> compiled = CompiledVision(encoder, "default")
    >>> features = compiled(torch.randn(1, 3, 224, 224), (12,))  # doctest: +SKIP
    >>> list(compiled.warmup_seconds)  # doctest: +SKIP
    [((1, 3, 224, 224), 'torch.float32', 'cpu', None, (12,), ())]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from .vision import DPAMVisionEncoder, VisionFeatures

logger = logging.getLogger(__name__)

#: ``torch.compile`` modes a model's ``inference_compile`` setting takes (``None``: eager).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Modes whose GPU graphs are CUDA graphs (their outputs live in buffers the next replay overwrites).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(inference_compile: str | None) -> str | None:
    """Check the ``inference_compile`` setting (at construction); ``"none"`` and ``None`` mean eager.

    Raises:
        ValueError: If it is not one of :data:`COMPILE_MODES`, naming the setting and the choices.
    """
    if inference_compile is None or inference_compile == "none":
        return None
    if inference_compile not in COMPILE_MODES:
        msg = (
            f"inference_compile must be None (eager) or a torch.compile mode, one of {', '.join(COMPILE_MODES)}; "
            f"got {inference_compile!r}. 'reduce-overhead' adds CUDA graphs on GPUs (lowest batch-1 latency)."
        )
        raise ValueError(msg)
    return inference_compile


class CompiledVision:
    """The vision encoder's :meth:`~DPAMVisionEncoder.encode` under ``torch.compile``, warm-up timed per input.

    Not an ``nn.Module``: it shares the encoder's weights without registering them twice (state dicts,
    ``.to()`` and checkpoints see the encoder only).

    Args:
        encoder: The frozen DPAM vision encoder.
        mode: A ``torch.compile`` mode of :data:`COMPILE_MODES`.
    """

    def __init__(self, encoder: DPAMVisionEncoder, mode: str) -> None:
        self.mode = check_compile_mode(mode)
        self.encoder = encoder
        # Static shapes: CUDA graphs need them, and inference has one image size and a few batch sizes.
        self._compiled = torch.compile(encoder.encode, mode=None if mode == "default" else mode, dynamic=False)
        #: Seconds of the first call per input signature (compilation, graph capture and that first run).
        self.warmup_seconds: dict[tuple, float] = {}

    def __getstate__(self) -> dict[str, object]:
        # A copy or a pickle compiles anew around its own encoder: the compiled function refers to the encoder it
        # was made from, and a deep copy would otherwise run the original's weights.
        return {"encoder": self.encoder, "mode": self.mode}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["encoder"], state["mode"])

    def __call__(
        self, images: torch.Tensor, feature_layers: Sequence[int], residual_layers: Sequence[int] = ()
    ) -> VisionFeatures:
        """Encode as :meth:`DPAMVisionEncoder.encode` does, through the compiled graph of this input."""
        autocast = (
            torch.get_autocast_dtype(images.device.type) if torch.is_autocast_enabled(images.device.type) else None
        )
        signature = (
            tuple(images.shape),
            str(images.dtype),
            str(images.device),
            str(autocast) if autocast is not None else None,
            tuple(feature_layers),
            tuple(residual_layers),
        )
        cuda_graphs = self.mode in CUDA_GRAPH_MODES and images.device.type == "cuda"
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        first = signature not in self.warmup_seconds
        start = time.perf_counter()
        features = self._compiled(images, tuple(feature_layers), tuple(residual_layers))
        if cuda_graphs:
            # The graph's outputs are its static buffers, overwritten by the next replay; the copies are small.
            features = VisionFeatures(
                image_features=features.image_features.clone(),
                patch_features=[feature.clone() for feature in features.patch_features],
                residual_features=[feature.clone() for feature in features.residual_features],
            )
        if first:
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            self.warmup_seconds[signature] = time.perf_counter() - start
            logger.info(
                "torch.compile (mode %s) warm-up for images %s %s%s on %s: %.1f s",
                self.mode,
                tuple(images.shape),
                str(images.dtype).removeprefix("torch."),
                f" under {str(autocast).removeprefix('torch.')} autocast" if autocast is not None else "",
                images.device,
                self.warmup_seconds[signature],
            )
        return features
