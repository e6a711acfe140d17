"""Register anomalib-faprompt with anomalib when anomalib's own modules are first imported.

Installed at the top of site-packages and imported by ``anomalib_faprompt_autoload.pth`` at interpreter start-up.
It uses the standard library only and does nothing until a program imports one of three anomalib modules. Once
one has loaded, it adds what the plugin provides, and changes nothing else (anomalib's logging, warnings and
other models stay as they are):

- ``anomalib.models``: ``import anomalib_faprompt``, which registers the models (``--model FAPrompt``,
  ``get_model("FAPrompt")``) and datamodules when its import completes;
- ``anomalib.cli.pipelines``: the ``anomalib zero_shot`` subcommand;
- ``anomalib.cli.cli``: the CLI's handling of our models' checkpoints and errors (inert for other models).

The ``anomalib zero_shot`` subcommand is this package's own: when a program runs it (``anomalib zero_shot ...``),
the deprecation warnings that importing anomalib prints at every start (:data:`IMPORT_WARNINGS`) are silenced for
it. Where start-up hooks do not run (``python -S``, some packagers) import ``anomalib_faprompt`` first, or give
full class paths (``--model anomalib_faprompt.FAPrompt``).
"""

import sys

WATCHED = ("anomalib.models", "anomalib.cli.pipelines", "anomalib.cli.cli")

#: Deprecation warnings that importing ``anomalib.models`` prints at every start, about code neither a user nor
#: this package can change: ``(message regex, category, regex of the module the warning is attributed to)``.
IMPORT_WARNINGS = (
    # anomalib.models.image.cfm imports timm.models.layers, which timm 1.0 renamed timm.layers.
    (r"Importing from timm\.models\.layers is deprecated", FutureWarning, r"timm\.models\.layers\Z"),
    # anomalib.models.image.dinomaly imports anomalib's own deprecated dinov2 package.
    (
        r"The anomalib\.models\.components\.dinov2 package is deprecated",
        FutureWarning,
        r"anomalib\.models\.image\.dinomaly\.",
    ),
)


def runs_our_subcommand(argv: list[str] | None = None) -> bool:
    """Whether this process is ``anomalib zero_shot ...``, this package's own subcommand."""
    argv = sys.argv if argv is None else argv
    program = argv[0].replace("\\", "/").rsplit("/", 1)[-1] if argv else ""
    return program in {"anomalib", "anomalib.exe"} and argv[1:2] == ["zero_shot"]


def _quiet_import_warnings() -> None:
    import warnings

    for message, category, module in IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _register() -> None:
    """Register what anomalib has loaded so far (importing the package does it when its import completes)."""
    if "anomalib_faprompt" not in sys.modules:
        import anomalib_faprompt  # noqa: F401

        return
    registration = sys.modules.get("anomalib_faprompt.registration")
    if registration is not None and hasattr(registration, "register_loaded"):
        registration.register_loaded()


class _RegisteringLoader:
    """Runs the real loader of a watched module, then registers."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._name == "anomalib.models" and runs_our_subcommand():
            _quiet_import_warnings()
        self._loader.exec_module(module)
        try:
            _register()
        except Exception as error:  # never break anomalib itself
            import warnings

            warnings.warn(f"anomalib-faprompt could not register with anomalib: {error!r}", stacklevel=2)


class _Finder:
    def __init__(self):
        self.pending = {name for name in WATCHED if name not in sys.modules}

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
                    spec.loader = _RegisteringLoader(spec.loader, name)
                return spec
        return None


if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
