"""Register anomalib-faprompt with anomalib when anomalib's own modules are first imported.

Installed at the top of site-packages and imported by ``anomalib_faprompt_autoload.pth`` at
interpreter start-up. It uses the standard library only and imports nothing else until a
program imports ``anomalib.models`` (models: ``--model FAPrompt``) or ``anomalib.cli.pipelines``
(the ``anomalib zero_shot`` subcommand), so unrelated programs pay nothing.
"""

import sys

_HOOKS = {
    "anomalib.models": "register",
    "anomalib.cli.pipelines": "register_pipelines",
}


class _RegisteringLoader:
    """Runs the real loader of a watched module, then the matching registration."""

    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        package = sys.modules.get("anomalib_faprompt")
        if package is not None and getattr(getattr(package, "__spec__", None), "_initializing", False):
            return  # anomalib_faprompt is being imported and registers itself when its import completes
        try:
            from anomalib_faprompt import registration

            getattr(registration, self._hook)()
        except Exception as error:  # never break anomalib itself
            import warnings

            warnings.warn(f"anomalib-faprompt could not register with anomalib: {error!r}", stacklevel=2)


class _Finder:
    def __init__(self):
        self.pending = {name for name in _HOOKS if name not in sys.modules}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader, _HOOKS[name])
                return spec
        return None


if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
