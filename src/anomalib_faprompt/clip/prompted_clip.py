"""Base torch model for prompt-learning methods on a frozen DPAM CLIP.

It owns the frozen encoders, the deep text prompts shared by the methods, the flag that says
whether prompts were trained or loaded, a cache for text features that do not depend on the
image (recomputed after every parameter update, once in total at inference), the smoothing of
the maps, the visual memory of few-shot references, and the forward pass every method shares:
a method writes only :meth:`PromptedCLIP.encode_static_text` and :meth:`PromptedCLIP.score_features`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_faprompt.components import GaussianSmoothing, VisualMemory, upsample_maps
from anomalib_faprompt.components.guards import accepted_images

from .compiled import CompiledVision, check_compile_mode
from .loading import build_clip
from .settings import backbone_geometry, check_float, check_int, check_layers
from .text import PromptedTextEncoder, PromptTemplate
from .vision import DPAMVisionEncoder, VisionFeatures

FROZEN_MODULES = ("vision", "text")


def _drop_frozen_weights(module: PromptedCLIP, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    del module, local_metadata
    for key in [key for key in state_dict if key.startswith(tuple(f"{prefix}{name}." for name in FROZEN_MODULES))]:
        del state_dict[key]


def _restore_frozen_weights(module: PromptedCLIP, state_dict: dict, prefix: str, *args: object) -> None:
    del args
    for name in FROZEN_MODULES:
        for key, value in getattr(module, name).state_dict(prefix=f"{prefix}{name}.", keep_vars=True).items():
            state_dict.setdefault(key, value.detach())
    # Checkpoints written before few-shot references existed hold no memory: they load with an empty one.
    state_dict.setdefault(f"{prefix}references.bank", torch.empty(0, 0, 0))


class PromptedCLIP(nn.Module):
    """Frozen CLIP with DPAM vision path, prompted text encoder and deep text prompts.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip tag, weights file, or ``None`` for random weights.
        image_size: Square input size in pixels (a multiple of the patch size).
        dpam_layers: Number of final vision blocks running the V-V path.
        text_depth: Number of text blocks that see learnable tokens (deep prompts before blocks 2..depth).
        text_n_ctx: Length of each deep prompt.
        temperature: Softmax temperature for every similarity.
        feature_layers: 1-indexed vision blocks whose patch features the method reads; ``None`` for the last.
        sigma: Gaussian smoothing of the anomaly map in pixels (0 disables it).
        reference_weight: Weight of the visual memory in the fused map and score when references were added
            (see :meth:`forward`); 0 ignores them.

    Raises:
        ValueError: If a setting is out of range for the backbone; raised before any weights load.
    """

    def __init__(
        self,
        backbone: str | Path,
        pretrained: str | Path | None,
        image_size: int,
        dpam_layers: int,
        text_depth: int,
        text_n_ctx: int,
        temperature: float = 0.07,
        feature_layers: Sequence[int] | None = None,
        sigma: float = 4.0,
        reference_weight: float = 0.5,
    ) -> None:
        super().__init__()
        geometry = backbone_geometry(backbone)
        image_size = geometry.check_image_size(image_size)
        dpam_layers = geometry.check_vision_blocks("dpam_layers", dpam_layers)
        feature_layers = check_layers("feature_layers", feature_layers, geometry.vision_depth)
        text_depth = check_int("text_depth", text_depth, 1, geometry.text_depth, "the text blocks of this backbone")
        text_n_ctx = check_int(
            "text_n_ctx", text_n_ctx, 1, geometry.context_length - 1, "the text tokens after the start token"
        )
        temperature = check_float("temperature", temperature, low_open=True, why="of every softmax")
        reference_weight = check_float(
            "reference_weight", reference_weight, high=1.0, why="of the visual memory in the fused map and score"
        )
        smoothing = GaussianSmoothing(sigma, max_size=image_size)
        clip = build_clip(backbone, pretrained)
        self.vision = DPAMVisionEncoder(clip.visual, dpam_layers, global_ln_post=self.global_ln_post)
        self.text = PromptedTextEncoder(clip, backbone)
        #: CLIP's learned ``logit_scale`` parameter as stored (not exponentiated); PromptAD multiplies by it.
        self.logit_scale = float(clip.logit_scale)
        self.image_size = image_size
        self.feature_layers = feature_layers
        self.temperature = temperature
        self.deep_prompts = nn.ParameterList(
            nn.Parameter(torch.randn(text_n_ctx, self.text.width) * 0.02) for _ in range(text_depth - 1)
        )
        self.register_buffer("prompts_ready", torch.tensor(False))
        self.smoothing = smoothing
        self.references = VisualMemory()
        self.reference_weight = reference_weight
        self._text_cache: tuple[tuple, object] | None = None
        #: The compiled vision encoder used in eval mode (:meth:`compile_inference`); ``None``: eager.
        self.compiled_vision: CompiledVision | None = None
        # Checkpoints hold what was learned; the frozen CLIP is rebuilt from backbone/pretrained
        # (a ViT-L/14 would otherwise add 1.7 GB to every checkpoint).
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_restore_frozen_weights)
        # Uniform module modes; the frozen CLIP has no dropout, so train/eval only switches the text cache.
        self.train()

    #: Whether the global image feature goes through ``ln_post`` (CLIP's own embedding) before ``proj``.
    global_ln_post: ClassVar[bool] = False

    #: Per learnable parameter name (``deep_prompts`` for every deep prompt), what each dimension is set by.
    prompt_dimensions: ClassVar[dict[str, tuple[str, ...]]] = {
        "deep_prompts": ("text_n_ctx", "text width of the backbone"),
    }

    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that training updates (prompts and any method-specific networks)."""
        return (parameter for parameter in self.parameters() if parameter.requires_grad)

    def cached(self, compute: Callable[[], object]) -> object:
        """Return ``compute()``, reusing the last result while the learnable parameters are unchanged.

        Under autograd in training mode the result is always recomputed, so gradients flow.
        """
        if self.training and torch.is_grad_enabled():
            self._text_cache = None
            return compute()
        if torch.compiler.is_exporting():
            # Parameters are fake tensors here: the features of the last eager call become graph constants.
            if self._text_cache is None:
                msg = (
                    "Run the model once in eval mode before torch.export so that its image-independent text "
                    "features are baked into the graph (the Lightning module's to_onnx/to_openvino do this)."
                )
                raise RuntimeError(msg)
            return self._text_cache[1]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.learnable_parameters())
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, compute())
        return self._text_cache[1]

    def forget_text_features(self) -> None:
        """Drop the cached text features: for changes :meth:`cached` cannot see (templates, loaded prototypes)."""
        self._text_cache = None

    def encode_prompts(self, *groups: tuple[PromptTemplate, torch.Tensor]) -> list[torch.Tensor]:
        """Encode groups of (template, contexts) in one fp32 text-encoder call, with the deep prompts.

        Returns:
            Per group, un-normalised features of shape (*contexts.shape[:-2], E).
        """
        filled = [template.fill(context) for template, context in groups]
        embeddings = torch.cat([embedding for embedding, _ in filled])
        eot_positions = torch.cat([positions for _, positions in filled])
        length = max(template.length for template, _ in groups)
        # fp32 under autocast too: text is a few percent of the FLOPs and FAPrompt's scores are sensitive to it.
        with torch.autocast(embeddings.device.type, enabled=False):
            features = self.text(embeddings.float(), eot_positions, [p.float() for p in self.deep_prompts], length)
        # shape[0], not len(): stays symbolic under torch.export (FAPrompt's DAP prompts scale with the batch).
        sizes = [positions.shape[0] for _, positions in filled]
        return [
            chunk.view(*context.shape[:-2], -1)
            for chunk, (_, context) in zip(features.split(sizes), groups, strict=True)
        ]

    def encode_image(
        self, images: torch.Tensor, feature_layers: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frozen DPAM vision forward without gradients; features returned in fp32, L2-normalised.

        Returns:
            Global features (B, E) and, per feature layer, patch features (B, N, E) without the class token.
        """
        with torch.no_grad():
            features = self.run_vision(images, feature_layers)
        image_features, patch_features = features.image_features, features.patch_features
        return (
            F.normalize(image_features.float(), dim=-1),
            [F.normalize(features[:, 1:].float(), dim=-1) for features in patch_features],
        )

    def compile_inference(self, mode: str | None) -> None:
        """Run the vision encoder compiled at inference (eval mode): a ``torch.compile`` mode, or ``None``.

        See :mod:`anomalib_faprompt.clip.compiled`; training and export stay eager.
        """
        mode = check_compile_mode(mode)
        self.compiled_vision = CompiledVision(self.vision, mode) if mode is not None else None

    def run_vision(
        self, images: torch.Tensor, feature_layers: Sequence[int], residual_layers: Sequence[int] = ()
    ) -> VisionFeatures:
        """The vision encoder's features: compiled in eval mode when :meth:`compile_inference` asked for it."""
        compiled = self.compiled_vision
        eager = compiled is None or self.training or torch.compiler.is_compiling() or torch.jit.is_tracing()
        if eager:
            return self.vision.encode(images, feature_layers, residual_layers)
        return compiled(images, feature_layers, residual_layers)

    # The forward pass every method shares -----------------------------------------------------------------

    def encode_static_text(self) -> Any:
        """The method's text features that do not depend on the image (cached, see :meth:`cached`)."""
        raise NotImplementedError

    def score_features(
        self, image_size: tuple[int, int], text: Any, image_features: torch.Tensor, patch_features: list[torch.Tensor]
    ) -> Any:
        """The method's own scoring of normalised image and patch features (see :meth:`encode_image`).

        Returns an output with ``pred_score`` (B,) and ``anomaly_map`` (B, H, W) at ``image_size``, before
        smoothing, and whatever the method's loss needs.
        """
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> Any:
        """Check the input, get the cached text features and the image features, and score them."""
        images = self.check_input(images)
        text = self.cached(self.encode_static_text)
        image_features, patch_features = self.encode_image(images, self.feature_layers)
        output = self.score_features((images.shape[-2], images.shape[-1]), text, image_features, patch_features)
        output.patch_features = patch_features
        return output

    def forward(self, images: torch.Tensor) -> Any:
        """Score images: ``InferenceBatch(pred_score, anomaly_map)`` in eval mode, intermediates in training.

        With few-shot references (:meth:`add_references`), map and score are fused with the visual memory:
        ``map = (1 - w) · prompt map + w · Σ_layers visual distance map`` and ``score = (1 - w) · prompt score
        + w · max(mean over layers of the visual distance map)``, with ``w = reference_weight`` and distances
        ``min_j (1 - cos) / 2`` to the references' patches of the same feature layer (WinCLIP+ and PromptAD fuse
        a textual and a visual branch the same way). Both keep the scale of the prompt outputs: scores in
        [0, 1], maps in [0, number of feature layers]. The fused map is then smoothed.
        """
        output = self.forward_features(images)
        if self.training:
            return output
        score, anomaly_map = output.pred_score, output.anomaly_map
        if not self.references.is_empty and self.reference_weight > 0:
            visual = self.visual_anomaly_maps(output.patch_features, (images.shape[-2], images.shape[-1]))
            weight = self.reference_weight
            anomaly_map = (1 - weight) * anomaly_map + weight * visual.sum(dim=0)
            score = (1 - weight) * score + weight * visual.mean(dim=0).flatten(1).amax(dim=1)
        return InferenceBatch(pred_score=score, anomaly_map=self.smoothing(anomaly_map))

    def visual_anomaly_maps(self, patch_features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Per feature layer, the distance of each patch to the references', upsampled: (layers, B, H, W)."""
        distances = self.references(torch.stack(patch_features))  # (layers, B, N)
        return torch.stack([upsample_maps(layer[..., None], size)[:, 0] for layer in distances])

    @property
    def reference_count(self) -> int:
        """Reference images in the visual memory (its entries over the patches of one image at ``image_size``)."""
        patches = (self.image_size // self.vision.patch_size) ** 2
        return self.references.bank.shape[1] // patches if not self.references.is_empty else 0

    @torch.no_grad()
    def add_references(self, images: torch.Tensor) -> None:
        """Add normal reference images (pre-processed, (k, 3, H, W)) to the visual memory.

        Their patch features of the feature layers (the features the prompts are compared with) are stored.
        """
        images = self.check_input(images)
        _, patch_features = self.encode_image(images, self.feature_layers)
        self.references.add(torch.stack(patch_features))

    def learned_state_names(self) -> list[str]:
        """Names of the learned state a prompt file holds: trainable parameters, then learned buffers.

        A buffer is learned state when the module holding it names it in a ``learned_buffers`` class
        attribute (:class:`~anomalib_faprompt.components.VisualMemory` names its ``bank``, the features of
        few-shot references): state that is not a parameter but that scoring depends on. ``prompts_ready``
        is not learned state (it says whether the learned state is trained).
        """
        names = [name for name, parameter in self.named_parameters() if parameter.requires_grad]
        for module_name, module in self.named_modules():
            for buffer_name in getattr(type(module), "learned_buffers", ()):
                if buffer_name not in dict(module.named_buffers(recurse=False)):
                    msg = f"{type(module).__name__} lists '{buffer_name}' in learned_buffers but has no such buffer."
                    raise AttributeError(msg)
                names.append(f"{module_name}.{buffer_name}" if module_name else buffer_name)
        return names

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state (prompts, prior network, learned buffers such as a visual memory): a prompt file's content."""
        parameters = dict(self.named_parameters())
        return {
            name: (parameters[name] if name in parameters else self.get_buffer(name)).detach().clone()
            for name in self.learned_state_names()
        }

    def load_prompt_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint", trained: bool = True
    ) -> None:
        """Load learned state, explaining which setting differs when shapes do not fit.

        Every learned parameter must be present. Learned buffers load with the shape they were saved with
        where their module allows it (a visual memory of any number of references); a buffer the state does
        not hold is left as it is (files written before buffers were saved, released checkpoints).

        Args:
            state_dict: Learned parameters and buffers by name (see :meth:`prompt_state_dict`).
            source: What they come from, for messages.
            trained: Whether they are trained prompts; sets ``prompts_ready``. A file saved from an
                untrained model loads with ``False`` and does not count as trained.

        Raises:
            ValueError: If the checkpoint was made with other settings or for another method.
        """
        own = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
        buffers = [name for name in self.learned_state_names() if name not in own]
        own_depth = len(self.deep_prompts) + 1
        their_depth = sum(name.startswith("deep_prompts.") for name in state_dict) + 1
        if their_depth != own_depth:
            msg = (
                f"Prompt checkpoint {source} does not fit this model: text_depth is {their_depth} there and "
                f"{own_depth} here. Construct the model with text_depth={their_depth}."
            )
            raise ValueError(msg)
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own) - set(buffers))
        if missing or unexpected:
            msg = (
                f"Prompt checkpoint {source} is not a {type(self).__name__} prompt checkpoint "
                f"(missing {missing}, unexpected {unexpected}); was it made by another method?"
            )
            raise ValueError(msg)
        for name, parameter in own.items():
            theirs = state_dict[name]
            if theirs.shape != parameter.shape:
                names = self.prompt_dimensions.get(name, self.prompt_dimensions.get(name.split(".")[0], ()))
                differing = [
                    f"{label}: {a} in the checkpoint, {b} here"
                    for label, a, b in zip(names, theirs.shape, parameter.shape, strict=False)
                    if a != b
                ] or [f"shape {tuple(theirs.shape)} in the checkpoint, {tuple(parameter.shape)} here"]
                msg = (
                    f"Prompt checkpoint {source} does not fit this model ({name}): " + "; ".join(differing) + ". "
                    "Construct the model with the settings the prompts were trained with."
                )
                raise ValueError(msg)
        with torch.no_grad():
            for name in (name for name in buffers if name in state_dict):
                self._load_learned_buffer(name, state_dict[name], source)
            for name, parameter in own.items():
                parameter.copy_(state_dict[name])
            self.prompts_ready.fill_(trained)

    def _load_learned_buffer(self, name: str, value: torch.Tensor, source: str) -> None:
        """Load one learned buffer by its module's own rule (a :class:`VisualMemory` takes the saved shape)."""
        module_name, _, buffer_name = name.rpartition(".")
        module = self.get_submodule(module_name)
        errors: list[str] = []
        # The module's _load_from_state_dict (the hook modules override to load state of a saved shape) with its
        # direct tensors only: load_state_dict would also reset this model's children that the state does not name.
        module._load_from_state_dict({buffer_name: value}, "", {}, False, [], [], errors)
        if errors:
            msg = f"Prompt checkpoint {source} does not fit this model ({name}): {' '.join(errors)}"
            raise ValueError(msg)

    def convert_released_state_dict(self, prompt_learner: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the authors' ``prompt_learner`` keys to this model's parameter names."""
        return {
            f"deep_prompts.{key.rsplit('.', 1)[1]}": value
            for key, value in prompt_learner.items()
            if key.startswith("compound_prompts_text.")
        }

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        """The images as the model takes them, or an error that says what to do.

        float16 and float64 images are cast to float32; an empty batch, another channel count than 3, integer pixels,
        non-square images or a size that is not a multiple of the patch size are refused (see
        :func:`~anomalib_faprompt.components.guards.accepted_images`).
        """
        images = accepted_images(images, type(self).__name__)
        if images.shape[-1] != images.shape[-2]:
            msg = (
                f"{type(self).__name__} scores square images; got shape {tuple(images.shape)}. Resize to "
                f"image_size={self.image_size} (the model's pre-processor does this)."
            )
            raise ValueError(msg)
        if images.shape[-1] % self.vision.patch_size or images.shape[-2] % self.vision.patch_size:
            msg = (
                f"Image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.vision.patch_size}; "
                f"resize to image_size={self.image_size} (the model's pre-processor does this)."
            )
            raise ValueError(msg)
        return images
