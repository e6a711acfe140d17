"""FAPrompt: Fine-grained Abnormality Prompt Learning for Zero-shot Anomaly Detection (ICCV 2025).

Compound abnormality prompts (CAP) learn K fine-grained abnormal prompts that share a normal
context; data-dependent abnormality prompts (DAP) adapt them per image from its most abnormal
patches through a small prior network. Prompts learn once on an auxiliary labelled dataset.

Paper: https://arxiv.org/abs/2410.10289

Example:
    >>> from anomalib_faprompt import FAPrompt
    >>> model = FAPrompt(backbone="ViT-B-16", pretrained=None, image_size=224, dpam_layers=10)
    >>> model.model.abnormal_context.shape
    torch.Size([10, 2, 512])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_faprompt.clip.compiled import check_compile_mode
from anomalib_faprompt.clip.settings import check_int, check_training
from anomalib_faprompt.models.prompt_module import PromptLifecycleMixin, check_references
from anomalib_faprompt.models.training_rules import MaskSupervisedPromptLearning

from .loss import FAPromptLoss
from .torch_model import FAPromptModel

__all__ = ["FAPrompt"]


class FAPrompt(PromptLifecycleMixin, MaskSupervisedPromptLearning, AnomalibModule):
    """FAPrompt Lightning module.

    Args:
        backbone: open_clip architecture name or path to an open_clip JSON config.
        pretrained: open_clip pretrained tag, path to a weights file (OpenAI JIT archive or state
            dict), or ``None`` for random weights.
        image_size: Square input size; the pre-processor resizes to it.
        dpam_layers: Number of final vision blocks running DPAM's V-V path (patch features come
            from the last block's V-V path).
        n_ctx_normal: Length of the normal context shared by all prompts.
        n_ctx_abnormal: Length of each compound abnormal context.
        n_abnormal_prompts: Number K of compound abnormal prompts.
        n_prior_patches: Number M of most abnormal patches fed to the prior network (DAP).
        text_depth: Text blocks that see learnable tokens.
        text_n_ctx: Length of each deep text prompt.
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        prompt_weights: Learned prompts to load (released ``{"prompt_learner": ...}`` checkpoints,
            files from ``save_prompt_weights`` or Lightning checkpoints). With it the model is zero-shot.
        learning_rate: Adam learning rate.
        betas: Adam betas.
        allow_untrained_prompts: Allow testing/predicting with untrained prompts, loading a prompt file saved
            untrained, and saving untrained prompts (the file records them as untrained) (experiments only).
            Prompts count as trained once an optimiser step has changed them, or when loaded trained. Untrained
            prompts are random draws: set ``seed_everything`` to compare runs.
        allow_setting_mismatch: Load ``prompt_weights`` (or a checkpoint) learned with other settings anyway.
            Prompt files and checkpoints record the CLIP architecture and weights (config hash; weights
            file size and hash of its first and last MiB, or open_clip tag), ``image_size`` and the layer and
            prompt-length settings, and by default loading them into a model with other values is refused,
            naming each setting. Released checkpoints and version-1 prompt files record no CLIP identity.
        max_epochs: Epochs of prompt learning. ``None`` leaves it to the trainer (15 in ``configs/``); when
            set it overrides the trainer's value, for runners that take no trainer config (``anomalib benchmark``);
            it must then be at least 1 (zero epochs would learn nothing).
        k_shot: Normal reference images whose patch features form a visual memory fused with the prompts' map
            and score (0: zero-shot). Sampled with ``reference_seed`` from the normal images of the datamodule's
            train split (the target's for ``AuxiliaryDataModule``) before validation, test and prediction, or
            the first ``k_shot`` images of ``few_shot_source``. A checkpoint keeps the memory of its last run,
            used only where no train split or source is available (predicting on a folder, export).
        few_shot_source: An image or folder of normal reference images to use instead of the train split.
        reference_seed: Seed of the sampling of the references from the train split.
        reference_weight: Weight ``w`` of the visual memory: map = (1 - w) · prompt map + w · visual map,
            score likewise (see ``PromptedCLIP.forward``); the references' features are those of the feature
            layers the prompts read, so no extra forward pass runs per test image.
        inference_compile: Run the frozen vision encoder under ``torch.compile`` at inference (test, predict,
            validation): ``"reduce-overhead"`` (CUDA graphs on GPUs: lowest batch-1 latency), ``"default"``,
            ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``; ``None`` (default) runs eagerly. Each new
            input shape compiles once (warm-up logged); training and export stay eager. Outputs equal eager
            within 1e-5 in fp32.
        pre_processor: Pre-processor, or ``True`` for the default (bicubic resize, CLIP normalisation).
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for the papers' metrics (image AUROC and AP, pixel AUROC and AUPRO)
            and image F1; threshold-free metrics are computed on raw outputs, before post-processing.
        visualizer: Visualizer, or ``True`` for anomalib's default.

    Raises:
        ValueError: If a setting is out of range (for the backbone), before any CLIP weights load.
    """

    method_name = "FAPrompt"

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 518,
        dpam_layers: int = 19,
        n_ctx_normal: int = 5,
        n_ctx_abnormal: int = 2,
        n_abnormal_prompts: int = 10,
        n_prior_patches: int = 10,
        text_depth: int = 9,
        text_n_ctx: int = 4,
        sigma: float = 10.0,
        prompt_weights: str | Path | None = None,
        learning_rate: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        allow_untrained_prompts: bool = False,
        allow_setting_mismatch: bool = False,
        max_epochs: int | None = None,
        k_shot: int = 0,
        few_shot_source: str | Path | None = None,
        reference_seed: int = 0,
        reference_weight: float = 0.5,
        inference_compile: str | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # Checked before anything is built; the normalised values are what hparams and checkpoints record.
        image_size = check_int("image_size", image_size)
        k_shot, few_shot_source, reference_seed = check_references(k_shot, few_shot_source, reference_seed)
        inference_compile = check_compile_mode(inference_compile)
        learning_rate, betas, max_epochs = check_training(learning_rate, betas, max_epochs)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = FAPromptModel(
            backbone=backbone,
            pretrained=pretrained,
            image_size=image_size,
            dpam_layers=dpam_layers,
            n_ctx_normal=n_ctx_normal,
            n_ctx_abnormal=n_ctx_abnormal,
            n_abnormal_prompts=n_abnormal_prompts,
            n_prior_patches=n_prior_patches,
            text_depth=text_depth,
            text_n_ctx=text_n_ctx,
            sigma=sigma,
            reference_weight=reference_weight,
        )
        self.loss = FAPromptLoss()
        self.learning_rate = learning_rate
        self.betas = betas
        self._init_prompts(
            prompt_weights,
            allow_untrained_prompts,
            max_epochs,
            allow_setting_mismatch,
            k_shot=k_shot,
            few_shot_source=few_shot_source,
            reference_seed=reference_seed,
            inference_compile=inference_compile,
        )

    def training_losses(
        self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one prompt-learning step (``loss`` is the total) on this process's part of the batch."""
        output = self.model.forward_features(images)
        shards = self.trainer.world_size if self._trainer is not None else 1
        return self.loss(
            output.static_maps,
            output.dap_maps,
            output.image_logits,
            output.score_logit,
            output.static_text.abnormal_each,
            output.prior,
            masks,
            labels,
            shards=shards,
        )
