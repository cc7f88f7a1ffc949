"""Reading raw input files without ever raising: what cannot be read becomes one problem line.

Every reader goes through these helpers for the operating system's part (a file that is a
directory, unreadable, a symbolic-link loop, a directory that cannot be listed), so no input makes
a run stop with a traceback, and every such input is counted.

The policy they hold (docs/notes.md, "Raw inputs"):

- only regular files are read: a FIFO would block a run for ever, ``/dev/zero`` would fill its
  memory; each is one problem line instead;
- a file read whole has a size cap per kind (:data:`LIMITS`), far above any real file of that kind;
- a file found by walking a configured directory (a run's explanations/ and scores/) is read only
  when it lies inside that directory with links resolved: a link to ``/etc/passwd`` named like an
  explanation is reported, not read and served. Paths the config names itself may be links.
"""

from __future__ import annotations

import errno
import os
import stat
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


MiB = 2**20
# The most a file of each kind read whole may hold. delphi writes explanations of a few hundred
# bytes and per-latent score files of at most a few MB; prompts.json is read whole by design.
LIMITS = {
    "explanation file": 1 * MiB,
    "run config file": 1 * MiB,
    "tokenizer config": 1 * MiB,
    "score file": 256 * MiB,
    "tokenizer file": 1024 * MiB,
    "firing counts": 1024 * MiB,
    "Neuronpedia batch": 1024 * MiB,
    "prompts.json": 16384 * MiB,
    "file": 64 * MiB,
}
_NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO, not a regular file",
    stat.S_IFCHR: "a character device, not a regular file",
    stat.S_IFBLK: "a block device, not a regular file",
    stat.S_IFSOCK: "a socket, not a regular file",
    stat.S_IFDIR: "is a directory, not a file",
}


def not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file, else None."""
    return None if stat.S_ISREG(mode) else _NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` (links followed) is not a regular file that can be opened, else None: for the
    readers that stream or map a file rather than read it whole."""
    try:
        kind = not_regular(os.stat(path).st_mode)
    except OSError as error:
        return f"file cannot be read ({reason(error)})"
    return f"file cannot be read ({kind})" if kind else None


def read_bytes(path: Path, problems: Problems, *, what: str = "file", **where) -> bytes | None:
    """The bytes of ``path``, or None with a problem naming it (``where``: ``line`` / ``latent``).

    ``what`` names the kind of file in messages and picks its size cap from :data:`LIMITS`."""
    limit = LIMITS.get(what, LIMITS["file"])
    try:
        # O_NONBLOCK: opening a FIFO that nobody writes must not wait; regular files ignore it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        kind = "missing" if error.errno == errno.ENOENT else "unreadable"
        problems.add(path, f"{what} cannot be read ({reason(error)})", kind=kind, **where)
        return None
    try:
        info = os.fstat(descriptor)
        kind = not_regular(info.st_mode)
        if kind:
            problems.add(path, f"{what} cannot be read ({kind})", kind="unreadable", **where)
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        problems.add(path, f"{what} cannot be read ({reason(error)})", kind="unreadable", **where)
        return None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        problems.add(
            path, f"{what} is over the {limit // MiB:,} MiB limit for its kind; not read", kind="invalid", **where
        )
        return None
    return data


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links resolved, lies inside ``root`` (links resolved)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a loop of links: reading it reports why
        return True


def walk(root: Path, problems: Problems, *, within: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Every file and every directory under ``root`` (hidden ones too), sorted; a link to a file
    outside ``within`` (default: ``root``) is reported and left out.

    A directory that cannot be listed is a problem, not a silent gap. Entries that are neither a
    file nor a directory to ``os.walk`` (a broken link, a loop of links) are listed as files, so
    reading them reports why.
    """
    files: list[Path] = []
    directories: list[Path] = []
    within = Path(within or root)

    def unlisted(error: OSError) -> None:
        if Path(error.filename or root) != Path(root) or Path(root).exists():
            problems.add(error.filename or root, f"directory cannot be listed ({reason(error)})", kind="unreadable")

    for directory, names, file_names in os.walk(root, onerror=unlisted):
        directories.extend(Path(directory, name) for name in names)
        for name in file_names:
            path = Path(directory, name)
            # Only links need resolving (one lstat each otherwise): see the module's policy.
            if os.path.islink(path) and not inside(path, within):
                problems.add(
                    path,
                    f"a link to {os.path.realpath(path)}, outside {within}; not read (files found in an input "
                    "directory must lie inside it)",
                    kind="unreadable",
                )
                continue
            files.append(path)
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
