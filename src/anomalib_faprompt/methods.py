"""The methods this package provides, listed once.

Everything that needs to know the methods reads :data:`METHODS`: registration on ``anomalib.models``
(``get_model("FAPrompt")``, the CLI's ``--model FAPrompt``), prompt loading (which method wrote a file),
the CLI's checkpoint handling, the tests and the benchmarks. The module uses the standard library only,
so the start-up hook can read it without importing torch; each Lightning class is imported on first use.

Each entry says:

- ``name``: the short name on ``anomalib.models`` (also the Lightning class's name);
- ``lightning_class``: its Lightning class, or the import path of it, loaded lazily (:meth:`Method.load`);
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

What a method learns from (:class:`Learning`) is its Lightning class's ``learning_types``, so a subclass keeps it.

A method of this package is its own package under ``models/`` and one entry in the built-in list below, as
PromptAD's::

    Method(name="PromptAD", lightning_class="anomalib_faprompt.models.promptad.PromptAD", prompt_identity="PromptAD")

A method of another package registers itself through :func:`register_method` (``register_method(MyMethod)``).
Nothing else needs editing: it is then resolvable on ``anomalib.models`` (``get_model``, ``--model <name>``),
gets the CLI's checkpoint handling, its prompt files are told apart from the others', and it runs in
``anomalib zero_shot`` tables; the built-in methods are also importable as ``anomalib_faprompt.<name>``.

Example:
    >>> from anomalib_faprompt.methods import METHODS, Learning
    >>> list(METHODS)
    ['AnomalyCLIP', 'FAPrompt', 'PromptAD']
    >>> METHODS["FAPrompt"].prompt_identity
    'FAPrompt'
    >>> Learning.AUXILIARY in METHODS["AnomalyCLIP"].load().learning_types
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
    lightning_class: str | type
    prompt_identity: str
    released_prompts: KeySignature | None = None
    unrecorded_checkpoint: KeySignature | None = None

    def load(self) -> type:
        """The Lightning class (imports its package on first use).

        Raises:
            ImportError: If ``lightning_class`` names no importable class.
        """
        if isinstance(self.lightning_class, type):
            return self.lightning_class
        module_name, _, class_name = self.lightning_class.rpartition(".")
        model_class = getattr(importlib.import_module(module_name), class_name, None)
        if not isinstance(model_class, type):
            msg = f"Method {self.name}: '{self.lightning_class}' is not a class (methods.METHODS entry)."
            raise ImportError(msg)
        return model_class


# The authors' released prompt learner (the AnomalyCLIP and FAPrompt READMEs): contexts, the token buffers built from
# them, deep prompts and their (unused) projections; FAPrompt adds the prior network, ``patch_meta_net``.
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

_BUILT_IN = (
    Method(
        name="AnomalyCLIP",
        lightning_class="anomalib_faprompt.models.anomaly_clip.AnomalyCLIP",
        prompt_identity="AnomalyCLIP",
        released_prompts=KeySignature(required=("ctx_pos", "ctx_neg"), optional=_RELEASED_PROMPT_LEARNER),
        unrecorded_checkpoint=KeySignature(
            required=("normal_context", "abnormal_context"), optional=("deep_prompts.*", "prompts_ready")
        ),
    ),
    Method(
        name="FAPrompt",
        lightning_class="anomalib_faprompt.models.faprompt.FAPrompt",
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
        prompt_identity="PromptAD",
    ),
)

_registry: dict[str, Method] = {method.name: method for method in _BUILT_IN}

#: The methods by short name: the built-in ones in the order listed, then those of :func:`register_method`. A
#: read-only view that follows registrations.
METHODS: Mapping[str, Method] = MappingProxyType(_registry)

#: The short names of this package's own methods.
BUILT_IN_METHODS = tuple(method.name for method in _BUILT_IN)

#: Constructor arguments every method shares that say how a run executes, not what was learned: prompt files do
#: not record them and checkpoints do not pass them on (the CLI's ``--ckpt_path``), so each run chooses its own.
RUN_TIME_SETTINGS = frozenset(
    {"prompt_weights", "allow_untrained_prompts", "allow_setting_mismatch", "inference_compile", "normal_images"}
)


def register_method(method: Method | type) -> Method:
    """Add a method to :data:`METHODS` and make it resolvable on ``anomalib.models`` by its short name.

    The public extension point for methods of other packages: call it once the class is defined (e.g. in the
    package's ``__init__``). Registering the same method again does nothing.

    Args:
        method: A Lightning class built on :class:`~anomalib_faprompt.models.base.PromptMethod` (its entry is
            ``Method(name=<class name>, lightning_class=<class>, prompt_identity=<its method_name>)``), or a
            :class:`Method` entry (to declare ``released_prompts``).

    Returns:
        The method's entry.

    Raises:
        ValueError: If the name or prompt identity is another method's, or anomalib has a model of that name.
        TypeError: If the class is not a prompt method.

    Example:
        >>> from anomalib_faprompt.methods import register_method, unregister_method
        >>> register_method(MyMethod)  # doctest: +SKIP
        Method(name='MyMethod', ...)
    """
    entry = method if isinstance(method, Method) else _entry_of(method)
    known = _registry.get(entry.name)
    if known == entry:
        return known
    clash = [m.name for m in _registry.values() if entry.name == m.name or entry.prompt_identity == m.prompt_identity]
    if clash:
        msg = f"Method '{entry.name}': its name or prompt identity is that of the registered method {clash[0]}."
        raise ValueError(msg)
    from .registration import expose_method

    expose_method(entry)
    _registry[entry.name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Undo :func:`register_method` (the built-in methods stay).

    Raises:
        ValueError: For a built-in method or a name that is not registered.
    """
    if name in BUILT_IN_METHODS or name not in _registry:
        msg = f"'{name}' is not a method registered with register_method (registered: {', '.join(_registry)})."
        raise ValueError(msg)
    from .registration import withdraw_model

    del _registry[name]
    withdraw_model(name)


def _entry_of(model_class: type) -> Method:
    identity = getattr(model_class, "method_name", None)
    if not isinstance(model_class, type) or not isinstance(identity, str):
        msg = (
            f"register_method takes a prompt method's Lightning class (a subclass of anomalib_faprompt.models.base."
            f"PromptMethod with a method_name) or a Method entry, got {model_class!r}."
        )
        raise TypeError(msg)
    return Method(name=model_class.__name__, lightning_class=model_class, prompt_identity=identity)


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
