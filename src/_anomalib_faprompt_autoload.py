"""Register anomalib-faprompt with anomalib when anomalib's own modules are first imported.

Installed at the top of site-packages and imported by ``anomalib_faprompt_autoload.pth`` at
interpreter start-up. It uses the standard library only and imports nothing else until a
program imports ``anomalib.models`` (models: ``--model FAPrompt``) or ``anomalib.cli.pipelines``
(the ``anomalib zero_shot`` subcommand), so unrelated programs pay nothing.

It also keeps anomalib's console readable (see ``anomalib_faprompt.logs``): before ``anomalib.models`` loads,
it silences the few third-party deprecation warnings that importing it (and running Lightning) prints at every
start (:data:`THIRD_PARTY_WARNINGS`, matched by message, category and module, so a program's own warnings still
show); when ``anomalib.loggers`` loads, its ``configure_logger`` is made to leave one console handler per logger
(:func:`_one_console_handler`); once ``anomalib.models`` has loaded, ``anomalib_faprompt.logs.install`` adds its
log filters.
"""

import sys

_HOOKS = {
    "anomalib.models": "register",
    "anomalib.cli.pipelines": "register_pipelines",
    "anomalib.cli.cli": "register_cli",  # --ckpt_path rebuilds our models; their errors in one line
}

#: Deprecation warnings about code that neither a user nor this package can change, printed at every start of a
#: program that imports ``anomalib.models`` (which ``--model FAPrompt`` and ``zero_shot`` need) or runs Lightning:
#: ``(message regex, category, regex of the module the warning is attributed to)``. Each names one warning of one
#: module, so the same text warned by other code, and any other warning, still shows.
THIRD_PARTY_WARNINGS = (
    # anomalib.models.image.cfm imports timm.models.layers, which timm 1.0 renamed timm.layers.
    (r"Importing from timm\.models\.layers is deprecated", FutureWarning, r"timm\.models\.layers\Z"),
    # anomalib.models.image.dinomaly imports anomalib's own deprecated dinov2 package.
    (
        r"The anomalib\.models\.components\.dinov2 package is deprecated",
        FutureWarning,
        r"anomalib\.models\.image\.dinomaly\.",
    ),
    # Lightning's pytree helper builds torch's deprecated LeafSpec in every fit, validation and test loop.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree\Z"),
)


def quiet_third_party_warnings() -> None:
    """Ignore :data:`THIRD_PARTY_WARNINGS` (idempotent: ``warnings`` drops an identical filter before adding it)."""
    import warnings

    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _is_rich_handler(handler) -> bool:
    return type(handler).__name__ == "RichHandler"


def _one_console_handler(loggers_module) -> None:
    """Make ``anomalib.loggers.configure_logger`` leave each record one console handler.

    anomalib's ``configure_logger`` (called by the ``anomalib`` CLI before anything else) runs
    ``logging.basicConfig`` *and* adds a ``RichHandler`` to the root logger, and adds another ``RichHandler`` next to
    Lightning's own stream handler on ``lightning.pytorch``: every record is printed twice, once plain on stderr and
    once by rich on stdout. After it runs, the plain handlers it doubled are removed and rich, anomalib's intended
    console, stays. Where the program had configured logging itself before (the root logger had handlers), its
    configuration is kept and the rich handlers are removed instead.
    """
    import functools
    import logging

    configure = getattr(loggers_module, "configure_logger", None)
    if configure is None or getattr(configure, "one_console_handler", False):
        return

    @functools.wraps(configure)
    def configure_logger(*args, **kwargs):
        root, lightning = logging.getLogger(), logging.getLogger("lightning.pytorch")
        configured_before = bool(root.handlers)
        before = {logger: list(logger.handlers) for logger in (root, lightning)}
        configure(*args, **kwargs)
        for logger, handlers in before.items():
            added = [handler for handler in logger.handlers if handler not in handlers]
            if not any(_is_rich_handler(handler) for handler in added):
                continue
            if configured_before:
                doubled = [handler for handler in added if _is_rich_handler(handler)]
            elif logger is root:
                doubled = [handler for handler in added if not _is_rich_handler(handler)]  # basicConfig's
            else:  # the stream handler Lightning adds to its logger when the root logger has none
                doubled = [h for h in handlers if type(h) is logging.StreamHandler and not logger.propagate]
            for handler in doubled:
                logger.removeHandler(handler)

    configure_logger.one_console_handler = True
    loggers_module.configure_logger = configure_logger


def _install_log_filters() -> None:
    from anomalib_faprompt import logs

    logs.install()


#: Run before a watched module loads.
_BEFORE = {"anomalib.models": quiet_third_party_warnings, "anomalib.cli.pipelines": quiet_third_party_warnings}
#: Run with the module once it has loaded (besides its registration hook, if any).
_AFTER = {"anomalib.loggers": _one_console_handler, "anomalib.models": lambda module: _install_log_filters()}


class _RegisteringLoader:
    """Runs the real loader of a watched module between its start-up steps, then the matching registration."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name
        self._hook = _HOOKS.get(name)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._name in _BEFORE:
            _BEFORE[self._name]()
        self._loader.exec_module(module)
        if self._name in _AFTER:
            try:
                _AFTER[self._name](module)
            except Exception as error:  # a quieter console is never worth breaking anomalib
                import warnings

                warnings.warn(f"anomalib-faprompt could not adjust anomalib's logging: {error!r}", stacklevel=2)
        if self._hook is None:
            return
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
        self.pending = {name for name in (*_HOOKS, *_BEFORE, *_AFTER) if name not in sys.modules}

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
