"""Result files of the pipelines: atomic writes, unreadable files set aside, a lock per folder, fingerprints.

A run killed at any moment leaves each result file either as it was or complete (:func:`atomic_write`); a file
left unreadable by an older kill is named, set aside and recomputed (:func:`set_aside`); two runs into one folder
are refused (:func:`results_dir_lock`); results are keyed by a fingerprint of the settings that made them.

Example:
    >>> fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": (1, 2), "b": 1})
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)


# Result files -------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through a temporary file in the same folder, renamed over it once complete.

    A kill at any moment leaves either the previous file or the new one, never a partial file.

    Args:
        path: Destination.
        write: Writes the content to the (temporary) path it is given.

    Returns:
        ``path``.

    Example:
        >>> atomic_write(Path("rows/MVTecAD_bottle.json"), lambda tmp: tmp.write_text("{}"))  # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with temporary.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON, atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8"))


def set_aside(path: Path, problem: object) -> Path:
    """Rename an unreadable result file to ``<name>.corrupt-<time>`` and say so in the log; it is then recomputed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for number in itertools.count(1):
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    os.replace(path, aside)
    logger.warning(
        "%s is unreadable (%s), probably left by an interrupted run: moved to %s, recomputing it.", path, problem, aside
    )
    return aside


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed run left in ``folder`` (only ever called under the run's lock)."""
    for path in folder.glob("*.tmp-*"):
        logger.info("Removing %s, left by an interrupted run.", path)
        path.unlink(missing_ok=True)


def read_json(path: Path, required: Collection[str], repair: bool = True) -> dict[str, Any] | None:
    """A result file's content, ``None`` if there is none; an unreadable file is set aside (``None``).

    With ``repair=False`` (the other processes of a distributed run: rank 0 repairs) it is only read.
    """
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or not set(required) <= set(content):
            msg = f"not a JSON object with {sorted(required)}"
            raise ValueError(msg)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError included
        if repair:
            set_aside(path, error)
        return None
    return content


def readable_prompts(path: Path, repair: bool = True) -> bool:
    """Whether a prompt file written by this pipeline loads intact; set aside (and so relearned) if not.

    A kill, a full disk or bit rot can leave a truncated or damaged file: its archive's checksums are compared
    (:func:`~anomalib_faprompt.prompt_weights.read_torch_file`). With ``repair=False`` (the other processes of a
    distributed run: rank 0 repairs) it is only read.
    """
    from anomalib_faprompt.prompt_weights import read_torch_file

    if not path.is_file():
        return False
    try:
        content = read_torch_file(path, "Prompt file")
        if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
            msg = "not a prompt file"
            raise ValueError(msg)
    except ValueError as error:  # damaged, truncated or foreign: read_torch_file names the cause
        if repair:
            set_aside(path, error)
        return False
    return True


class ResultsDirLockedError(RuntimeError):
    """Another zero-shot run is writing into the results directory."""


@contextlib.contextmanager
def results_dir_lock(results_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``results_dir`` (created if needed) while a run writes into it.

    The lock is ``flock`` on ``<results_dir>/.lock``, which records the holder's pid and host. The system
    releases it when the holder's process ends, killed or not, so no stale lock survives a crash. Where
    ``fcntl`` does not exist (Windows) runs are not locked, with a warning.

    Example:
        >>> with results_dir_lock("results/zero_shot"):  # doctest: +SKIP
        ...     ZeroShot().run_config(config)  # refused: the folder is locked
        Traceback (most recent call last):
        ResultsDirLockedError: 'results/zero_shot' is in use by another zero_shot run (pid 4242 on host) ...

    Raises:
        ResultsDirLockedError: If another process, or another run in this process, holds the lock.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        logger.warning("No file locking on this platform: a second run into %s would not be refused.", results_dir)
        yield
        return
    descriptor = os.open(results_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "a process starting up"
            msg = (
                f"'{results_dir}' is in use by another zero_shot run ({holder}); two runs would overwrite each "
                f"other's results. Wait for it to finish, or give this run another results_dir."
            )
            raise ResultsDirLockedError(msg) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


# Fingerprints -------------------------------------------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """Settings as plain JSON values: tuples and OmegaConf lists as lists, enums by value, other objects as text."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [canonical(item) for item in value]
    return str(value)


def fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings' canonical JSON (sorted keys, no spaces): equal settings give equal fingerprints.

    Example:
        >>> fingerprint({"sigma": 4.0, "feature_layers": (24,)}) == fingerprint({"feature_layers": [24], "sigma": 4.0})
        True
    """
    text = json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
