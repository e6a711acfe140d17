"""The methods this package provides, listed once.

Everything that needs to know the methods reads :data:`METHODS`: registration on ``anomalib.models``
(``get_model("FAPrompt")``, the CLI's ``--model FAPrompt``), prompt loading (which method wrote a file),
the CLI's checkpoint handling, the tests and the benchmarks. The module uses the standard library only,
so the start-up hook can read it without importing torch; each Lightning class is imported on first use.

Each entry says:

- ``name``: the short name on ``anomalib.models`` (also the Lightning class's name);
- ``lightning_class``: the import path of its Lightning module, loaded lazily (:meth:`Method.load`);
- ``learning_types``: what it can learn from (:class:`Learning`);
- ``prompt_identity``: the ``method`` string written into its prompt files (``save_prompt_weights``)
  and Lightning checkpoints (``checkpoint["prompt_settings"]["method"]``), equal to the class's
  ``method_name``. Loading compares it and refuses another method's prompts, naming both;
- ``released_prompts``: the keys of the authors' released ``{"prompt_learner": ...}`` checkpoints, which
  record no method: a released file is recognised by these declared keys (:class:`KeySignature`), never by
  a guess in the loader. ``None`` when the authors released none in that format;
- ``unrecorded_checkpoint``: the keys of Lightning checkpoints written before checkpoints recorded their
  method (this package's versions before prompt files had settings, which had only AnomalyCLIP and FAPrompt).
  Such a checkpoint is recognised by these keys of its torch model (the ``model.`` entries of its
  ``state_dict``); a method added later declares none, since every checkpoint it writes records its method,
  and an unrecorded checkpoint that matches no entry (or more than one) is refused.

Adding a method takes its own package under ``models/`` and one entry here, as PromptAD's::

    Method(
        name="PromptAD",
        lightning_class="anomalib_faprompt.models.promptad.PromptAD",
        learning_types=(Learning.FEW_SHOT_PROMPTS, Learning.FEW_SHOT),
        prompt_identity="PromptAD",
    ),

Nothing else needs editing: it is then registered on ``anomalib.models``, importable as
``anomalib_faprompt.PromptAD``, gets the CLI's checkpoint handling, its prompt files are told apart from the
others', and the tests and benchmarks parametrised over :data:`METHODS` cover it.

Example:
    >>> from anomalib_faprompt.methods import METHODS, Learning
    >>> list(METHODS)
    ['AnomalyCLIP', 'FAPrompt', 'PromptAD']
    >>> METHODS["FAPrompt"].prompt_identity
    'FAPrompt'
    >>> Learning.AUXILIARY in METHODS["AnomalyCLIP"].learning_types
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any


class Learning(str, Enum):
    """What a method can learn from.

    anomalib's ``LearningType`` (``one_class``, ``zero_shot``, ``few_shot``) has no name for prompts learned on
    labelled anomalies of *other* categories, nor for prompts learned from a few normal images, so this list is
    ours; :attr:`anomalib_learning_type` gives the ``LearningType`` a model reports while doing it (which decides
    whether anomalib's ``Engine`` runs ``fit``).
    """

    #: Scores categories it never saw with prompts loaded from a file (``prompt_weights=...``), no training.
    ZERO_SHOT = "zero_shot"
    #: Learns its prompts on labelled anomalous images with masks of other categories (``AuxiliaryDataModule``),
    #: then scores unseen categories zero-shot.
    AUXILIARY = "auxiliary"
    #: Uses k normal images of the target category as references (a visual memory), with learned prompts loaded.
    FEW_SHOT = "few_shot"
    #: Learns its prompts from the k normal images of the target category, one category at a time (fitting runs on
    #: the category's normal train split), and keeps them as its visual memory.
    FEW_SHOT_PROMPTS = "few_shot_prompts"

    @property
    def anomalib_learning_type(self) -> Any:
        """The ``anomalib.LearningType`` of this way of learning (``AUXILIARY``: ``ONE_CLASS``, so that ``fit`` runs).

        Example:
            >>> Learning.AUXILIARY.anomalib_learning_type
            <LearningType.ONE_CLASS: 'one_class'>
        """
        from anomalib import LearningType

        return {
            Learning.ZERO_SHOT: LearningType.ZERO_SHOT,
            Learning.AUXILIARY: LearningType.ONE_CLASS,
            Learning.FEW_SHOT: LearningType.FEW_SHOT,
            Learning.FEW_SHOT_PROMPTS: LearningType.ONE_CLASS,
        }[self]


@dataclass(frozen=True)
class KeySignature:
    """A declared set of state-dict keys (``fnmatch`` patterns, case-sensitive) that identifies a file format.

    Keys match when every ``required`` pattern matches at least one key and every key matches a ``required``
    or ``optional`` pattern: a file with a key the format does not have, or without one it must have, does
    not match.

    Example:
        >>> signature = KeySignature(required=("ctx_pos", "compound_prompts_text.*"), optional=("token_*",))
        >>> signature.matches(["ctx_pos", "compound_prompts_text.0", "token_prefix_pos"])
        True
        >>> signature.matches(["ctx_pos", "compound_prompts_text.0", "patch_meta_net.linear1.weight"])
        False
    """

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        """Whether ``keys`` are exactly this format's (see the class docstring)."""
        keys = list(keys)
        patterns = (*self.required, *self.optional)
        return all(any(fnmatchcase(key, pattern) for key in keys) for pattern in self.required) and all(
            any(fnmatchcase(key, pattern) for pattern in patterns) for key in keys
        )


@dataclass(frozen=True)
class Method:
    """One method: its names, its Lightning class and the formats its prompts come in (see the module docstring)."""

    name: str
    lightning_class: str
    learning_types: tuple[Learning, ...]
    prompt_identity: str
    released_prompts: KeySignature | None = None
    unrecorded_checkpoint: KeySignature | None = None

    def load(self) -> type:
        """The Lightning class (imports its package on first use).

        Raises:
            ImportError: If ``lightning_class`` names no importable class.
        """
        module_name, _, class_name = self.lightning_class.rpartition(".")
        model_class = getattr(importlib.import_module(module_name), class_name, None)
        if not isinstance(model_class, type):
            msg = f"Method {self.name}: '{self.lightning_class}' is not a class (methods.METHODS entry)."
            raise ImportError(msg)
        return model_class


# The authors' released prompt learner (SPEC §3): contexts, the token buffers built from them, deep prompts
# and their (unused) projections; FAPrompt adds the prior network, ``patch_meta_net``.
_RELEASED_PROMPT_LEARNER = (
    "token_prefix_pos",
    "token_suffix_pos",
    "token_prefix_neg",
    "token_suffix_neg",
    "tokenized_prompts_pos",
    "tokenized_prompts_neg",
    "compound_prompts_text.*",
    "compound_prompt_projections.*",
)

_ALL = (
    Method(
        name="AnomalyCLIP",
        lightning_class="anomalib_faprompt.models.anomaly_clip.AnomalyCLIP",
        learning_types=(Learning.ZERO_SHOT, Learning.AUXILIARY),
        prompt_identity="AnomalyCLIP",
        released_prompts=KeySignature(required=("ctx_pos", "ctx_neg"), optional=_RELEASED_PROMPT_LEARNER),
        unrecorded_checkpoint=KeySignature(
            required=("normal_context", "abnormal_context"), optional=("deep_prompts.*", "prompts_ready")
        ),
    ),
    Method(
        name="FAPrompt",
        lightning_class="anomalib_faprompt.models.faprompt.FAPrompt",
        learning_types=(Learning.ZERO_SHOT, Learning.AUXILIARY),
        prompt_identity="FAPrompt",
        released_prompts=KeySignature(
            required=("ctx_pos", "ctx_neg", "patch_meta_net.*"), optional=_RELEASED_PROMPT_LEARNER
        ),
        unrecorded_checkpoint=KeySignature(
            required=("normal_context", "abnormal_context", "prior.*"), optional=("deep_prompts.*", "prompts_ready")
        ),
    ),
    Method(
        name="PromptAD",
        lightning_class="anomalib_faprompt.models.promptad.PromptAD",
        learning_types=(Learning.FEW_SHOT_PROMPTS, Learning.FEW_SHOT),
        prompt_identity="PromptAD",
    ),
)

#: The methods by short name, in the order listed.
METHODS: Mapping[str, Method] = MappingProxyType({method.name: method for method in _ALL})

#: Constructor arguments every method shares that say how a run executes, not what was learned: prompt files do
#: not record them and checkpoints do not pass them on (the CLI's ``--ckpt_path``), so each run chooses its own.
RUN_TIME_SETTINGS = frozenset(
    {"prompt_weights", "allow_untrained_prompts", "allow_setting_mismatch", "inference_compile"}
)


def get_method(name: str) -> Method:
    """The entry of the method named ``name`` (short name or prompt identity).

    Raises:
        ValueError: Naming the known methods.
    """
    for method in METHODS.values():
        if name in {method.name, method.prompt_identity}:
            return method
    msg = f"Unknown method '{name}'; the methods of anomalib-faprompt are {', '.join(METHODS)}."
    raise ValueError(msg)


def method_classes() -> list[type]:
    """The Lightning class of every method (imports them)."""
    return [method.load() for method in METHODS.values()]


def released_prompts_methods(keys: Iterable[str]) -> list[Method]:
    """The methods whose released ``prompt_learner`` has exactly these keys (normally one, or none)."""
    keys = list(keys)
    return [m for m in METHODS.values() if m.released_prompts is not None and m.released_prompts.matches(keys)]


def recorded_method(checkpoint: Mapping[str, Any]) -> str | None:
    """The prompt identity of the method that wrote a Lightning checkpoint, or ``None`` if it is none of ours.

    New checkpoints record it (``checkpoint["prompt_settings"]["method"]``). Checkpoints written before they
    did are recognised by the declared ``unrecorded_checkpoint`` keys of their torch model; one matching no
    entry, or more than one, gives ``None``.
    """
    settings = checkpoint.get("prompt_settings")
    if isinstance(settings, Mapping) and settings.get("method"):
        return str(settings["method"])
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping):
        return None
    keys = [key.removeprefix("model.") for key in state_dict if key.startswith("model.")]
    if not keys:
        return None
    found = [
        m for m in METHODS.values() if m.unrecorded_checkpoint is not None and m.unrecorded_checkpoint.matches(keys)
    ]
    return found[0].prompt_identity if len(found) == 1 else None
