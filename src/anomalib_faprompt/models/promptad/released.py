"""Loading the PromptAD release's files: its prompt learners, or its inference checkpoints (prototypes, galleries).

The release trains two models per category and sampling, an image-level (``CLS-…``) and a pixel-level (``SEG-…``)
run; :func:`load_released` puts them into :class:`~.torch_model.PromptADModel`'s two heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .torch_model import PromptADModel


def load_released(
    model: PromptADModel, image: dict[str, torch.Tensor], pixel: dict[str, torch.Tensor], source: str = ""
) -> None:
    """Load the release's two models (its image-level ``CLS-…`` and pixel-level ``SEG-…`` runs) into the heads.

    Each may be a ``prompt_learner`` state (``normal_ctx``, ``abnormal_ctx`` and the token buffers, whose
    prompts are re-encoded here) or an inference checkpoint (``text_features`` and the galleries
    ``feature_gallery1``/``feature_gallery2``, README: Method), whose prototypes and memory are used as they
    are. Both must be of one kind.

    Raises:
        ValueError: If a file is neither, its widths or prompt counts differ from this model's (naming the
            setting), its token buffers were built for another object or CLIP, or the two inference
            checkpoints hold different galleries.
    """
    states = {"image": image, "pixel": pixel}
    kinds = {name: _released_kind(state, f"{source} ({name} head)") for name, state in states.items()}
    if len(set(kinds.values())) != 1:
        msg = f"Released PromptAD files {source}: one is a prompt learner, the other an inference checkpoint."
        raise ValueError(msg)
    with torch.no_grad():
        if kinds["image"] == "prompt_learner":
            for name, state in states.items():
                _load_prompt_learner(model, name, state, f"{source} ({name} head)")
            model.released_prototypes = torch.empty(0, device=model.released_prototypes.device)
        else:
            _load_inference_checkpoints(model, image, pixel, source)
        model.prompts_ready.fill_(True)
    model.forget_text_features()


def _load_prompt_learner(model: PromptADModel, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    head = model.heads[name]
    setting = "n_pro_image" if name == "image" else "n_pro_pixel"
    labels = {
        "normal_ctx": (setting, "n_ctx", "text width of the backbone"),
        "abnormal_ctx": ("n_pro_ab", "n_ctx_ab", "text width of the backbone"),
    }
    for key, parameter in (("normal_ctx", head.normal_context), ("abnormal_ctx", head.abnormal_context)):
        theirs = state[key]
        if theirs.shape != parameter.shape:
            differing = [
                f"{label} is {a} there and {b} here"
                for label, a, b in zip(labels[key], theirs.shape, parameter.shape, strict=False)
                if a != b
            ]
            msg = f"Released PromptAD prompts {source} do not fit this model ({key}): " + "; ".join(differing)
            raise ValueError(msg + ". Construct the model with the release's backbone and settings.")
    if head.templates is not None:
        for key, template in (("normal_token_suffix", "normal"), ("abnormal_token_suffix_handle", "manual")):
            ours, theirs = head.templates[template].suffix, state.get(key)
            # The release keeps a row per prompt; a template here is one row when every prompt shares it.
            if theirs is not None and (
                theirs.shape[1:] != ours.shape[1:]
                or ours.shape[0] not in {1, theirs.shape[0]}
                or not torch.allclose(theirs, ours.expand_as(theirs), atol=1e-4)
            ):
                msg = (
                    f"Released PromptAD prompts {source} were built for another object name, manual states or "
                    f"CLIP than this model's (category '{model.category}'): their {key} differs. Construct the "
                    "model with the category and CLIP weights they were trained with."
                )
                raise ValueError(msg)
    head.normal_context.copy_(state["normal_ctx"])
    head.abnormal_context.copy_(state["abnormal_ctx"])


def _load_inference_checkpoints(
    model: PromptADModel, image: dict[str, torch.Tensor], pixel: dict[str, torch.Tensor], source: str
) -> None:
    width = model.text.text_projection.shape[1]
    for name, state in (("image", image), ("pixel", pixel)):
        if tuple(state["text_features"].shape) != (2, width):
            msg = (
                f"Released PromptAD checkpoint {source} ({name} head): text_features of shape "
                f"{tuple(state['text_features'].shape)}, this backbone's embedding needs (2, {width}). Construct "
                "the model with the backbone it was trained with (the release's is ViT-B-16-plus-240)."
            )
            raise ValueError(msg)
    galleries = [torch.stack([state["feature_gallery1"], state["feature_gallery2"]]) for state in (image, pixel)]
    if galleries[0].shape != galleries[1].shape or not torch.allclose(*galleries, atol=1e-6):
        msg = (
            f"Released PromptAD checkpoints {source}: the image and pixel checkpoints hold different galleries "
            "(other normal images), and the model keeps one visual memory. Use the two runs of one sampling."
        )
        raise ValueError(msg)
    memory_width = model.vision.visual.transformer.width
    if galleries[0].shape[-1] != memory_width:
        msg = (
            f"Released PromptAD checkpoint {source}: galleries of width {galleries[0].shape[-1]}, this backbone's "
            f"vision width is {memory_width}. Construct the model with the backbone it was trained with."
        )
        raise ValueError(msg)
    model.references.reset()
    model.references.add(galleries[0][:, None].to(model.released_prototypes.device))
    prototypes = torch.stack([F.normalize(image["text_features"].float(), dim=-1),
                              F.normalize(pixel["text_features"].float(), dim=-1)])  # fmt: skip
    model.released_prototypes = prototypes.to(model.released_prototypes.device)


_PROMPT_LEARNER_KEYS = {"normal_ctx", "abnormal_ctx"}
_INFERENCE_KEYS = {"text_features", "feature_gallery1", "feature_gallery2"}


def _released_kind(state: object, source: str) -> str:
    """Which of the release's files ``state`` is: ``prompt_learner`` or ``inference``."""
    keys = set(state) if isinstance(state, dict) else set()
    if keys >= _PROMPT_LEARNER_KEYS:
        return "prompt_learner"
    if keys >= _INFERENCE_KEYS:
        return "inference"
    msg = (
        f"{source} is not one of PromptAD's released files: expected a prompt learner (normal_ctx, abnormal_ctx, …) "
        f"or an inference checkpoint (text_features, feature_gallery1, feature_gallery2); found keys {sorted(keys)}."
    )
    raise ValueError(msg)
