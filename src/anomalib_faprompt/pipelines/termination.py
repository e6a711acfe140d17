"""A ``zero_shot`` run stopped by SIGTERM ends as an interrupted run: non-zero status, lock released, work kept.

Schedulers (Slurm, Kubernetes, systemd) stop jobs with SIGTERM. Inside Lightning it meets Lightning's own handler,
which only sets a flag: training then stops at the end of the batch by raising ``SIGTERMException``, a
``SystemExit`` without a code (exit status 0 and no ``results.csv``: a scheduler reads success), and testing
goes on to the end. While :func:`stop_on_sigterm` holds,
SIGTERM raises :class:`Terminated` wherever the run is (Lightning's handler calls it after its own), which
unwinds like Ctrl+C does: atomic writes leave complete files or none, the results folder's lock is released,
finished prompts and rows stay, a rerun resumes from them, and the process exits with status 143 (128 + 15).

Example:
    >>> with stop_on_sigterm("results/zero_shot"):  # doctest: +SKIP
    ...     run_the_protocol()
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)


class Terminated(SystemExit):
    """The run received SIGTERM; its exit status is 128 + the signal's number."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Terminated(128 + signum)


@contextmanager
def stop_on_sigterm(results_dir: str | Path) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (in the main thread; elsewhere nothing changes).

    The previous handler comes back afterwards. When the block ends by SIGTERM, the log says what was kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        logger.error(
            "zero_shot stopped by SIGTERM: the prompts and rows finished so far are kept in %s; run the same command "
            "again to resume from them.",
            results_dir,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
