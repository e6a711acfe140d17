"""Build open_clip models and load their weights, offline-friendly.

The backbone is an open_clip architecture name (``"ViT-L-14-336"``) or a path to an
open_clip JSON model config. Weights come from an open_clip pretrained tag (``"openai"``),
from a local file (OpenAI's JIT archive, or an OpenAI/open_clip state dict), or are left
randomly initialised with ``pretrained=None``.

Example:
    >>> from anomalib_faprompt.clip import build_clip
    >>> clip = build_clip("ViT-B-16", pretrained=None)
    >>> clip.visual.conv1.kernel_size
    (16, 16)
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Keys of OpenAI's JIT archives that are not parameters.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsNotFoundError(FileNotFoundError):
    """CLIP weights are neither on disk nor downloadable."""


def model_config(backbone: str | Path) -> dict[str, Any]:
    """Return the open_clip model config for a name or a JSON config path.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.

    Returns:
        The config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).

    Raises:
        ValueError: If the name is unknown and no such file exists.
    """
    import open_clip

    path = Path(backbone)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            msg = f"open_clip config file '{path}' does not exist."
            raise FileNotFoundError(msg)
        config = json.loads(path.read_text())
        return config.get("model_cfg", config)
    config = open_clip.get_model_config(str(backbone).replace("/", "-"))
    if config is None:
        msg = (
            f"Unknown CLIP backbone '{backbone}'. Use an open_clip architecture name "
            f"(e.g. 'ViT-L-14-336', see open_clip.list_models()) or a path to an open_clip JSON config."
        )
        raise ValueError(msg)
    return config


def _is_jit_archive(path: Path) -> bool:
    """OpenAI's JIT archives are zip files with TorchScript code; plain state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a weights file; returns the state dict and whether it was an OpenAI JIT archive."""
    if _is_jit_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, OpenAI ships JIT
            archive = torch.jit.load(str(path), map_location="cpu")
        state_dict = {k: v for k, v in archive.state_dict().items() if k not in _JIT_EXTRA_KEYS}
        return state_dict, True
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        msg = f"'{path}' holds a {type(checkpoint).__name__}, not a CLIP state dict."
        raise ValueError(msg)
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}, False


def _download_tag(name: str, tag: str, cache_dir: str | None) -> str:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name, tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        msg = (
            f"'{tag}' is neither a file nor a pretrained tag of '{name}'. "
            f"Known tags: {tags}. Pass pretrained=/path/to/weights for a local file."
        )
        raise WeightsNotFoundError(msg)
    try:
        return download_pretrained(pretrained_cfg, cache_dir=cache_dir)
    except Exception as error:
        source = pretrained_cfg.get("url") or f"https://huggingface.co/{pretrained_cfg.get('hf_hub', '')}"
        msg = (
            f"Could not obtain the '{tag}' weights of {name} ({type(error).__name__}: {error}). "
            f"This machine may be offline. Download them from {source} on a machine with internet "
            f"access, copy the file here and pass pretrained=/path/to/that/file "
            f"(CLI: --model.pretrained /path/to/that/file)."
        )
        raise WeightsNotFoundError(msg) from error


def build_clip(
    backbone: str | Path = "ViT-L-14-336",
    pretrained: str | Path | None = "openai",
    cache_dir: str | None = None,
) -> nn.Module:
    """Build an open_clip ``CLIP`` model in float32 with frozen weights.

    OpenAI weights (the ``openai`` tag or an OpenAI JIT archive) always run with QuickGELU,
    whatever the architecture config says, as they were trained with it.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip pretrained tag, path to a weights file, or ``None`` for
            randomly initialised weights.
        cache_dir: Download cache for pretrained tags.

    Returns:
        The CLIP model in eval mode, parameters frozen.

    Raises:
        WeightsNotFoundError: If the weights file is missing or a tag cannot be downloaded.
    """
    from open_clip.model import CLIP, convert_to_custom_text_state_dict

    config = dict(model_config(backbone))
    name = str(backbone).replace("/", "-")
    state_dict = None
    if pretrained is not None:
        path = Path(pretrained)
        is_file_like = path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or len(path.parts) > 1
        if path.is_file():
            state_dict, is_jit = _read_state_dict(path)
            config["quick_gelu"] = config.get("quick_gelu", False) or is_jit
        elif is_file_like:
            msg = (
                f"CLIP weights file '{path}' does not exist. Pass the path of an existing OpenAI JIT archive "
                f"(e.g. ViT-L-14-336px.pt) or open_clip state dict, an open_clip tag such as 'openai' "
                f"(downloaded on first use), or pretrained=None for random weights."
            )
            raise WeightsNotFoundError(msg)
        else:
            state_dict, _ = _read_state_dict(Path(_download_tag(name, str(pretrained), cache_dir)))
            config["quick_gelu"] = config.get("quick_gelu", False) or str(pretrained) == "openai"

    config.pop("custom_text", None)
    model = CLIP(**config)
    if state_dict is not None:
        if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
            state_dict = convert_to_custom_text_state_dict(state_dict)
        state_dict.pop("logit_bias", None)
        if "logit_scale" in state_dict:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state_dict)
    model = model.float().eval().requires_grad_(False)
    model.quick_gelu = bool(config.get("quick_gelu", False))
    return model


def build_tokenizer(backbone: str | Path, context_length: int) -> Any:
    """Return open_clip's tokenizer for the backbone (CLIP's BPE tokenizer for JSON configs)."""
    import open_clip

    path = Path(backbone)
    if path.suffix == ".json" or path.is_file():
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(str(backbone).replace("/", "-"), context_length=context_length)
