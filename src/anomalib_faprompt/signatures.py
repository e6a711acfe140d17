"""The constructor arguments a class takes, following ``**kwargs`` passed on to its bases' constructors.

The prompt methods declare only their own settings and pass the shared ones on (``super().__init__(**kwargs)``),
which jsonargparse and Lightning follow. :func:`constructor_parameters` gives the same view to the code that asks
which arguments a class takes (the CLI's checkpoint rules, the ``zero_shot`` config checks and planner).

Example:
    >>> class Base:
    ...     def __init__(self, image_size: int = 518, k_shot: int = 0) -> None: ...
    >>> class Method(Base):
    ...     def __init__(self, n_ctx: int = 12, image_size: int = 240, **kwargs) -> None: ...
    >>> {name: parameter.default for name, parameter in constructor_parameters(Method).items()}
    {'n_ctx': 12, 'image_size': 240, 'k_shot': 0}
"""

from __future__ import annotations

import inspect
from typing import Any

_PASSED_ON = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named constructor arguments of ``cls`` and of the bases its ``**kwargs`` reach (a subclass's default wins).

    A constructor with ``**kwargs`` is taken to pass them to the next constructor in the MRO, as ``super().__init__``
    does; the walk stops at the first constructor without them.
    """
    parameters: dict[str, inspect.Parameter] = {}
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None:
            continue
        own = inspect.signature(init).parameters
        for name, parameter in list(own.items())[1:]:  # not self
            if parameter.kind not in _PASSED_ON:
                parameters.setdefault(name, parameter)
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in own.values()):
            break
    return parameters


def takes_any_keyword(cls: type) -> bool:
    """Whether ``cls``'s constructor chain ends in ``**kwargs`` that no base names (any keyword is accepted)."""
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None:
            continue
        if owner is object:
            return False
        own = inspect.signature(init).parameters.values()
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in own):
            return False
    return True


def defaults(cls: type) -> dict[str, Any]:
    """The default of each constructor argument of ``cls`` that has one (:func:`constructor_parameters`)."""
    return {
        name: parameter.default
        for name, parameter in constructor_parameters(cls).items()
        if parameter.default is not inspect.Parameter.empty
    }
