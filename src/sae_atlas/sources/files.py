"""Reading raw input files without ever raising: what cannot be read becomes one problem line.

Every reader goes through these helpers for the operating system's part (a file that is a
directory, unreadable, a symbolic-link loop, a directory that cannot be listed), so no input makes
a run stop with a traceback, and every such input is counted.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sae_atlas.problems import Problems

_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "a part of its path is not a directory",
    errno.ELOOP: "a loop of symbolic links",
    errno.ENOENT: "no such file",
    errno.ENAMETOOLONG: "name too long",
}


def reason(error: OSError) -> str:
    """A short reason for an operating-system error."""
    return _REASONS.get(error.errno, (error.strerror or str(error)).lower())


def read_bytes(path: Path, problems: Problems, *, what: str = "file", **where) -> bytes | None:
    """The bytes of ``path``, or None with a problem naming it (``where``: ``line`` / ``latent``)."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        kind = "missing" if error.errno == errno.ENOENT else "unreadable"
        problems.add(path, f"{what} cannot be read ({reason(error)})", kind=kind, **where)
        return None


def walk(root: Path, problems: Problems) -> tuple[list[Path], list[Path]]:
    """Every file and every directory under ``root`` (hidden ones too), sorted.

    A directory that cannot be listed is a problem, not a silent gap. Entries that are neither a
    file nor a directory to ``os.walk`` (a broken link, a loop of links) are listed as files, so
    reading them reports why.
    """
    files: list[Path] = []
    directories: list[Path] = []

    def unlisted(error: OSError) -> None:
        if Path(error.filename or root) != Path(root) or Path(root).exists():
            problems.add(error.filename or root, f"directory cannot be listed ({reason(error)})", kind="unreadable")

    for directory, names, file_names in os.walk(root, onerror=unlisted):
        directories.extend(Path(directory, name) for name in names)
        files.extend(Path(directory, name) for name in file_names)
    files.sort()
    directories.sort()
    return files, directories


def list_directory(path: Path, problems: Problems) -> list[Path]:
    """The entries of one directory, sorted; a problem (and none) when it cannot be listed."""
    try:
        return sorted(Path(path).iterdir())
    except OSError as error:
        problems.add(path, f"directory cannot be listed ({reason(error)})", kind="unreadable")
        return []
