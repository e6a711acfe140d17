"""Refuse damaged prompt files and checkpoints before they load.

``torch.save`` writes a zip archive that holds a CRC-32 of every member (the pickled structure and each tensor's
bytes), but ``torch.load`` does not compare them: a file whose tensor data changed on disk (bit rot, a copy cut
short and padded, a bad transfer) loads without a word and every score it gives is wrong. :func:`check_file`
reads each member once and compares its checksum, which costs one read of a file that holds only learned state
(prompts, a prior network, a visual memory: kilobytes to a few hundred megabytes).

Files torch wrote in its legacy format (before torch 1.6) hold no checksums and pass unchecked; so do archives
written with ``torch.serialization.config.save.compute_crc32 = False``, whose checksums are all zero.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "prompts.pt"
    >>> torch.save({"ctx": torch.ones(4)}, path)
    >>> check_file(path, "Prompt weights file")  # intact: returns quietly
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

#: The first bytes of a zip archive (a local file header): a file starting so but unreadable as an archive was cut.
ZIP_MAGIC = b"PK\x03\x04"

#: Files found intact, by path, size and modification time: a file read twice in one process is checked once.
_intact: set[tuple[str, int, int]] = set()


class DamagedFileError(ValueError):
    """A file's bytes do not match the checksums written with them, or the file is cut short."""


def _advice(role: str) -> str:
    return f"Copy the {role.lower()} again from a good source, or write it again (retrain)."


def check_file(path: str | Path, role: str) -> None:
    """Refuse a torch archive whose members do not match their checksums, naming the file and the member.

    Args:
        path: The file (an existing one; callers say themselves when it does not exist).
        role: What the file is, for the message (``"Prompt weights file"``, ``"Checkpoint"``).

    Raises:
        DamagedFileError: If a member's bytes do not match its CRC-32, or the archive is cut short.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _intact:
        return
    with path.open("rb") as file:
        starts_as_zip = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if not zipfile.is_zipfile(path):
        if starts_as_zip:
            msg = (
                f"{role} '{path}' is truncated or damaged: it starts as a torch archive but its directory at the end "
                f"is missing ({stat.st_size} bytes: cut short by an interrupted copy or write?). {_advice(role)}"
            )
            raise DamagedFileError(msg)
        return  # not a zip archive: torch's legacy format (no checksums), or no torch file at all (the loader says)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not any(member.CRC for member in members if member.file_size):
                return  # written without checksums (compute_crc32=False): nothing to compare
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, zlib.error, ValueError) as error:
        msg = f"{role} '{path}' is damaged: its archive cannot be read ({error}). {_advice(role)}"
        raise DamagedFileError(msg) from error
    if bad is not None:
        msg = (
            f"{role} '{path}' is damaged: the bytes of its member '{bad}' do not match the checksum written with "
            f"them (changed on disk since it was saved: bit rot, or a copy cut short and padded). Loading it would "
            f"give wrong scores without an error. {_advice(role)}"
        )
        raise DamagedFileError(msg)
    _intact.add(key)


def is_file_path(value: object) -> bool:
    """Whether ``value`` names an existing file (a ``str`` or ``os.PathLike``)."""
    return isinstance(value, str | os.PathLike) and Path(value).is_file()
