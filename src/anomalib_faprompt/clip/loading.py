"""Build open_clip models and load their weights, offline-friendly.

The backbone is an open_clip architecture name (``"ViT-L-14-336"``) or a path to an
open_clip JSON model config. Weights come from an open_clip pretrained tag (``"openai"``),
from a local file (OpenAI's JIT archive, or an OpenAI/open_clip state dict), or are left
randomly initialised with ``pretrained=None``. Weights files are read by open_clip's
``load_state_dict`` (torch or safetensors files, training checkpoints); OpenAI's JIT archives, which
open_clip reads only inside its own OpenAI model builder, are read here (see :func:`_load_weights`).

A tag's file is taken from the download caches first (Hugging Face hub cache, open_clip's URL cache),
without network. Otherwise it is downloaded, unless the machine is offline: with ``HF_HUB_OFFLINE``
set, or when the server does not answer within a few seconds, :class:`WeightsNotFoundError` says at
once which file to fetch and to pass ``pretrained=/path/to/that/file`` (instead of the downloaders'
minute of retries).

Example:
    >>> from anomalib_faprompt.clip import build_clip
    >>> clip = build_clip("ViT-B-16", pretrained=None)
    >>> clip.visual.conv1.kernel_size
    (16, 16)
"""

from __future__ import annotations

import json
import logging
import os
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


def _read_jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of an OpenAI JIT archive (open_clip reads these only through its own OpenAI model builder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, OpenAI ships JIT
        archive = torch.jit.load(str(path), map_location="cpu")
    return {k: v for k, v in archive.state_dict().items() if k not in _JIT_EXTRA_KEYS}


def _load_weights(model: nn.Module, path: Path, is_jit: bool) -> None:
    """Load a weights file into ``model``, strictly.

    The file is read by open_clip's ``load_state_dict`` (torch and safetensors files, ``{"state_dict": ...}``
    training checkpoints, DistributedDataParallel's ``module.`` prefix), OpenAI's JIT archives by
    :func:`_read_jit_state_dict`. open_clip's ``load_checkpoint`` is not used to apply it: it silently
    interpolates the positional embeddings of weights made for another image size than the architecture's
    (a ViT-L-14 config given the ViT-L-14-336 weights would run with resized embeddings); a strict
    ``load_state_dict`` refuses them.

    Raises:
        ValueError: Naming the file, if it holds no state dict or one of another architecture.
    """
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    if is_jit:
        state_dict = _read_jit_state_dict(path)
    else:
        try:
            state_dict = load_state_dict(str(path))
        except (AttributeError, StopIteration) as error:  # open_clip assumes a non-empty mapping (.items())
            content = torch.load(path, map_location="cpu", weights_only=True)
            kind = "an empty dict" if isinstance(content, dict) else f"a {type(content).__name__}"
            msg = f"'{path}' holds {kind}, not a CLIP state dict."
            raise ValueError(msg) from error
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    state_dict.pop("logit_bias", None)
    if "logit_scale" in state_dict:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    advice = "Pass the backbone (architecture name or JSON config) the weights were made for."
    try:
        incompatible = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shapes that differ
        msg = f"CLIP weights '{path}' do not fit the architecture: {' '.join(str(error).split())} {advice}"
        raise ValueError(msg) from error
    if incompatible.missing_keys or incompatible.unexpected_keys:
        differences = [
            f"{len(keys)} {kind} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for kind, keys in (("missing", incompatible.missing_keys), ("unexpected", incompatible.unexpected_keys))
            if keys
        ]
        msg = f"CLIP weights '{path}' do not fit the architecture: {'; '.join(differences)}. {advice}"
        raise ValueError(msg)


#: Seconds to wait for the download server to answer before a tag that is not cached counts as unobtainable.
PROBE_TIMEOUT = 3.0


def _is_set(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the server of ``url`` cannot be reached, or ``None`` when it answers (any HTTP status).

    One HEAD request with a short timeout, in a thread so that a slow name lookup cannot hold it up either.
    Proxies from the environment apply, as for the download. A TLS failure means a server answered, so it
    counts as reachable (the downloader may trust other certificates).
    """
    import ssl
    import threading
    import urllib.error
    import urllib.request

    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                pass
            outcome["reason"] = None
        except urllib.error.HTTPError:
            outcome["reason"] = None
        except urllib.error.URLError as error:
            tls = isinstance(error.reason, ssl.SSLError | ssl.CertificateError)
            outcome["reason"] = None if tls else f"{type(error.reason).__name__}: {error.reason}"
        except ssl.SSLError:
            outcome["reason"] = None
        except Exception as error:
            outcome["reason"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=probe, name="clip-weights-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome.get("reason", f"no answer within {timeout:g} s")


def _hub_files(pretrained_cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The Hugging Face repository and the file names open_clip tries for a tag, when it uses the hub."""
    from open_clip import pretrained as open_clip_pretrained

    hub = pretrained_cfg.get("hf_hub", "")
    if not hub or not open_clip_pretrained.has_hf_hub():
        return None
    repository, filename = hub.rsplit("/", 1)
    filename = filename or open_clip_pretrained.HF_WEIGHTS_NAME
    alternatives = getattr(open_clip_pretrained, "_get_safe_alternatives", lambda name: ())
    return repository, [*alternatives(filename), filename]


def _url_cache_file(url: str, cache_dir: str | None) -> Path:
    """Where open_clip keeps a file it downloads from a URL (and OpenAI's ``clip`` package keeps its own)."""
    return Path(cache_dir or Path("~/.cache/clip").expanduser()) / Path(url).name


def _cached_tag(pretrained_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The tag's weights file when a download cache holds it (no network)."""
    import huggingface_hub

    hub = _hub_files(pretrained_cfg)
    if hub is not None:
        repository, filenames = hub
        for filename in filenames:
            cached = huggingface_hub.try_to_load_from_cache(repository, filename, cache_dir=cache_dir)
            if isinstance(cached, str) and Path(cached).is_file():
                return cached
    url = pretrained_cfg.get("url")
    if url and _url_cache_file(url, cache_dir).is_file():
        from open_clip.pretrained import download_pretrained_from_url

        return download_pretrained_from_url(url, cache_dir=cache_dir)  # checks the file's SHA-256, no download
    return None


def _download_tag(name: str, tag: str, cache_dir: str | None) -> str:
    """The local file of an open_clip tag's weights: from a cache, or downloaded.

    Offline this fails within seconds, before huggingface_hub's and open_clip's retry loops: when
    ``HF_HUB_OFFLINE`` is set, or when the server (``HF_ENDPOINT``, or the tag's URL) does not answer
    within :data:`PROBE_TIMEOUT` seconds.

    Raises:
        WeightsNotFoundError: Saying where to download the file and to pass ``pretrained=/path/to/file``.
    """
    import open_clip
    from huggingface_hub import constants
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name, tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        msg = (
            f"'{tag}' is neither a file nor a pretrained tag of '{name}'. "
            f"Known tags: {tags}. Pass pretrained=/path/to/weights for a local file."
        )
        raise WeightsNotFoundError(msg)
    if "file" in pretrained_cfg:
        return pretrained_cfg["file"]
    cached = _cached_tag(pretrained_cfg, cache_dir)
    if cached is not None:
        return cached

    hub = _hub_files(pretrained_cfg)
    url = pretrained_cfg.get("url", "")
    sources = [url] if url else []
    if hub is not None:
        sources.append(f"{constants.ENDPOINT}/{hub[0]}/resolve/main/{hub[1][-1]}")
    advice = (
        f"Download them from {' or '.join(sources)} on a machine with internet access, copy the file here and pass "
        f"pretrained=/path/to/that/file (CLI: --model.pretrained /path/to/that/file)."
    )
    if hub is not None:
        offline = constants.HF_HUB_OFFLINE or _is_set(os.environ.get("HF_HUB_OFFLINE"))
        reason = "HF_HUB_OFFLINE is set" if offline else _unreachable(constants.ENDPOINT)
        server = constants.ENDPOINT
    else:
        reason = _unreachable(url)
        server = url
    if reason is not None:
        msg = (
            f"Could not obtain the '{tag}' weights of {name}: they are in no download cache and {server} cannot be "
            f"reached ({reason}). This machine may be offline. {advice}"
        )
        raise WeightsNotFoundError(msg)
    try:
        return download_pretrained(pretrained_cfg, cache_dir=cache_dir)
    except Exception as error:
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        msg = f"Could not obtain the '{tag}' weights of {name} ({detail}). {advice}"
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
    from open_clip.model import CLIP

    config = dict(model_config(backbone))
    name = str(backbone).replace("/", "-")
    weights: tuple[Path, bool] | None = None  # the file and whether it is an OpenAI JIT archive
    if pretrained is not None:
        path = Path(pretrained)
        is_file_like = path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or len(path.parts) > 1
        if path.is_file():
            weights = (path, _is_jit_archive(path))
            config["quick_gelu"] = config.get("quick_gelu", False) or weights[1]
        elif is_file_like:
            msg = (
                f"CLIP weights file '{path}' does not exist. Pass the path of an existing OpenAI JIT archive "
                f"(e.g. ViT-L-14-336px.pt) or open_clip state dict, an open_clip tag such as 'openai' "
                f"(downloaded on first use), or pretrained=None for random weights."
            )
            raise WeightsNotFoundError(msg)
        else:
            path = Path(_download_tag(name, str(pretrained), cache_dir))
            weights = (path, _is_jit_archive(path))
            config["quick_gelu"] = config.get("quick_gelu", False) or str(pretrained) == "openai"

    config.pop("custom_text", None)
    model = CLIP(**config)
    if weights is not None:
        _load_weights(model, *weights)
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
