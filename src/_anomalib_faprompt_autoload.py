"""Register anomalib-faprompt's models with anomalib when ``anomalib.models`` is first imported.

Installed at the top of site-packages and imported by ``anomalib_faprompt_autoload.pth`` at
interpreter start-up. It uses the standard library only and imports nothing else until a
program imports ``anomalib.models`` itself, so unrelated programs pay nothing.
"""

import sys

_TARGET = "anomalib.models"


class _RegisteringLoader:
    """Runs the real loader of ``anomalib.models``, then registers our models."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            import anomalib_faprompt  # noqa: F401  (registers on import)
        except Exception as error:  # never break anomalib itself
            import warnings

            warnings.warn(f"anomalib-faprompt could not register its models: {error!r}", stacklevel=2)


class _Finder:
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


if _TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
