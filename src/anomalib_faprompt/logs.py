"""A readable console for runs of this package's models and subcommand: each message once, no adverts.

Only our own runs are tidied, never another model's: :func:`tidy_console` runs when the ``anomalib`` CLI builds one
of our models or runs ``anomalib zero_shot`` (the CLI hooks of :mod:`anomalib_faprompt.cli`), and when the
``zero_shot`` pipeline runs. It leaves one console handler where anomalib's ``configure_logger`` doubles every
record (plain on stderr and rich on stdout), silences Lightning's ``LeafSpec`` deprecation warning, which every fit
and test loop prints, and adds logging filters to the loggers of a few notices that anomalib and Lightning repeat
for every trainer, datamodule or model they build (:func:`install`); each filter matches one message of one logger,
so everything else (and the user's own loggers) is untouched:

- Lightning's ``GPU available: …`` / ``TPU available: …`` lines: once per process for each distinct text;
- Lightning's ``💡 Tip: …`` adverts for its cloud products: not shown;
- anomalib's ``Initializing <Model> model.``: once per model class (``zero_shot`` builds each model three times:
  to plan, to learn the prompts, to evaluate them);
- anomalib's ``Number of devices is greater than 1, setting compute_on_cpu to False.``: once per process (its
  evaluator repeats it at every setup of a trainer over several devices);
- anomalib's ``Found the dataset.``: once per dataset root, naming it (every datamodule's ``prepare_data`` logs it,
  for each category and stage);

One filter concerns our models only and is installed when the package registers (:func:`install_model_filters`):
anomalib's ``ckpt_path is not provided. Model weights will not be loaded.`` is not shown for a prompt model whose
prompts are loaded (``prompt_weights=``) or trained; without them the model refuses to predict anyway, naming what
to do, and the warning stays. Records about any other model pass unchanged.

:func:`quiet_export` silences the ONNX exporter's optimisation passes (hundreds of ``Replaced initializer`` records
per export) while a model is exported.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: Loggers Lightning's ``rank_zero_info`` logs on, depending on which of its packages set it up last.
RANK_ZERO_LOGGERS = (
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)
#: Per-trainer notices of Lightning shown once per process for each distinct text.
ONCE_PER_TEXT = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:")
#: anomalib's evaluator's notice at every setup of a trainer over several devices (each fit and test, per process).
EVALUATOR_DEVICE_NOTICE = "Number of devices is greater than 1, setting compute_on_cpu to False."
#: Loggers of the ONNX exporter's graph passes (torch.onnx runs onnxscript's optimiser, which logs each rewrite).
EXPORT_LOGGERS = ("onnx_ir", "onnxscript")

_FILTER_MARK = "_anomalib_faprompt_filter"


def _calling_frame(record: logging.LogRecord) -> FrameType | None:
    """The frame that made ``record`` (a filter runs inside the logging call, so the frame is still on the stack)."""
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if code.co_filename == record.pathname and code.co_name == record.funcName:
            return frame
        frame = frame.f_back
    return None


class LightningNotices(logging.Filter):
    """Drop Lightning's adverts; let each distinct per-trainer device notice through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown."""
        message = record.getMessage()
        if message.startswith("💡 Tip:"):
            return False
        if message.startswith(ONCE_PER_TEXT):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


class ModelInitialisedOnce(logging.Filter):
    """anomalib's ``Initializing <Model> model.``: once per model class."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[Any] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown."""
        if record.msg != "Initializing %s model.":
            return True
        key = record.args
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class DatasetFoundOnce(logging.Filter):
    """anomalib's ``Found the dataset.``: once per dataset root, naming the root."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str | None] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown."""
        if record.msg != "Found the dataset.":
            return True
        frame = _calling_frame(record)
        root = getattr(frame.f_locals.get("self"), "root", None) if frame is not None else None
        key = None if root is None else str(root)
        if key in self.seen:
            return False
        self.seen.add(key)
        if key is not None:
            record.msg = f"Found the dataset at {key}."
        return True


class OncePerProcess(logging.Filter):
    """Records with one of ``texts`` as their message: the first one only."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts, self.seen = frozenset(texts), set[str]()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown."""
        message = record.getMessage()
        if message not in self.texts:
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class CheckpointWarningForReadyPrompts(logging.Filter):
    """anomalib's ``ckpt_path is not provided`` warning, dropped for a prompt model whose prompts are usable.

    ``Engine.predict`` warns whenever no checkpoint is given; a prompt model built with ``prompt_weights=`` (or
    trained in this process) has its weights, so the warning would be wrong. A prompt model without them refuses
    to predict with :class:`~anomalib_faprompt.models.readiness.UntrainedPromptsError`, after the warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown."""
        if not record.getMessage().startswith("ckpt_path is not provided"):
            return True
        frame = _calling_frame(record)
        if frame is None:
            return True
        model = frame.f_locals.get("model")
        if model is None:
            trainer = getattr(frame.f_locals.get("self"), "_trainer", None)
            model = getattr(trainer, "lightning_module", None)
        from anomalib_faprompt.methods import method_classes

        return not (isinstance(model, tuple(method_classes())) and bool(model.model.prompts_ready))


def _add_filter(logger_name: str, log_filter: logging.Filter) -> None:
    """Add ``log_filter`` to a logger unless a filter of its class from this module is there already."""
    logger = logging.getLogger(logger_name)
    if not any(type(existing).__name__ == type(log_filter).__name__ and hasattr(existing, _FILTER_MARK)
               for existing in logger.filters):  # fmt: skip
        setattr(log_filter, _FILTER_MARK, True)
        logger.addFilter(log_filter)


def install() -> None:
    """Add the repeated-notice filters of this module's docstring to anomalib's and Lightning's loggers (idempotent).

    Logger filters apply to the records of that very logger, so each filter goes to the module logger that
    logs the message.
    """
    lightning_notices = LightningNotices()
    for name in RANK_ZERO_LOGGERS:
        _add_filter(name, lightning_notices)
    _add_filter("anomalib.models.components.base.anomalib_module", ModelInitialisedOnce())
    _add_filter("anomalib.metrics.evaluator", OncePerProcess(EVALUATOR_DEVICE_NOTICE))
    dataset_found = DatasetFoundOnce()
    datamodule_loggers = [
        name
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("anomalib.data.datamodules.") and name.count(".") == 4
    ]
    for name in sorted({*datamodule_loggers, "anomalib.data.datamodules.image.mvtecad"}):
        _add_filter(name, dataset_found)


def install_model_filters() -> None:
    """Add the filter that concerns our models only (the checkpoint warning for ready prompts; idempotent)."""
    _add_filter("anomalib.engine.engine", CheckpointWarningForReadyPrompts())


#: Lightning's pytree helper builds torch's deprecated ``LeafSpec`` in every fit, validation and test loop.
LOOP_WARNING = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\.")


def one_console_handler() -> None:
    """Leave each record one console handler where anomalib's ``configure_logger`` gave it two.

    ``configure_logger`` (called by the ``anomalib`` CLI before anything else) runs ``logging.basicConfig`` *and* adds
    a ``RichHandler`` to the root logger, and adds another ``RichHandler`` next to Lightning's own stream handler on
    ``lightning.pytorch``: every record is printed twice, plain on stderr and by rich on stdout. The plain handlers
    beside a rich one are removed; rich, anomalib's intended console, stays.
    """
    for logger in (logging.getLogger(), logging.getLogger("lightning.pytorch")):
        if any(type(handler).__name__ == "RichHandler" for handler in logger.handlers):
            for handler in [handler for handler in logger.handlers if type(handler) is logging.StreamHandler]:
                logger.removeHandler(handler)


def tidy_console() -> None:
    """Tidy the console of a run of our models or subcommand (see the module docstring; idempotent)."""
    one_console_handler()
    message, category, module = LOOP_WARNING
    warnings.filterwarnings("ignore", message=message, category=category, module=module)
    install()


@contextmanager
def quiet_export() -> Iterator[None]:
    """Raise the ONNX exporter's pass loggers to ``WARNING`` while exporting (their warnings and errors still show).

    Example:
        >>> import logging
        >>> with quiet_export():
        ...     logging.getLogger("onnx_ir.passes").isEnabledFor(logging.INFO)
        False
    """
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
