"""Bookkeeping for bad input: every reader reports here instead of raising.

A malformed file never aborts a run. Readers call :meth:`Problems.add`, which records a one-line
description naming the file (and the line or latent when known); the runner counts them per stage,
prints them in the run report and stores them in the sidecars. Under ``--strict`` the first problem
raises :class:`StrictModeError` instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

# Sidecars keep this many problems verbatim; the counts always cover all of them.
MAX_LISTED = 200


# Feature ids are UInt32 in every output: a latent id beyond it cannot be stored, whatever the SAE.
MAX_LATENT_ID = 2**32 - 1


def latent_out_of_range(latent: int, width: int | None) -> str | None:
    """Why ``latent`` cannot be an id of an SAE of ``width`` latents (None when it can)."""
    if width is not None and latent >= width:
        return f"latent {latent} is outside the SAE ({width:,} latents)"
    if latent > MAX_LATENT_ID:
        return f"latent {latent} is beyond the largest feature id the outputs hold ({MAX_LATENT_ID:,})"
    return None


def quoted(name: str) -> str:
    """A file name as messages show it: as is when it prints on one line, else quoted with its
    control characters escaped (a name may hold a newline)."""
    return name if name.isprintable() else repr(name)


@dataclass(frozen=True)
class Problem:
    """One bad input: the file, where in it, and what is wrong, in one line."""

    file: str
    message: str
    line: int | None = None
    latent: int | None = None
    kind: str = "malformed"

    def __str__(self) -> str:
        where = quoted(self.file)
        if self.line is not None:
            where += f":{self.line}"
        if self.latent is not None:
            where += f" (latent {self.latent})"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


class StrictModeError(RuntimeError):
    """Raised by :meth:`Problems.add` when the run is strict."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


class Problems:
    """Collects the problems of one stage; raises on the first one when ``strict``."""

    def __init__(self, *, strict: bool = False):
        self.strict = strict
        self.items: list[Problem] = []

    def add(
        self,
        file: str | Path,
        message: str,
        *,
        line: int | None = None,
        latent: int | None = None,
        kind: str = "malformed",
    ) -> None:
        """Record a problem with ``file``; under strict mode, raise it instead."""
        problem = Problem(str(file), " ".join(message.split()), line=line, latent=latent, kind=kind)
        if self.strict:
            raise StrictModeError(problem)
        self.items.append(problem)

    def extend(self, items: list[Problem]) -> None:
        """Record problems found elsewhere (e.g. by a worker process); strict mode raises the first."""
        for problem in items:
            if self.strict:
                raise StrictModeError(problem)
            self.items.append(problem)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def counts(self) -> dict[str, int]:
        """Number of problems per kind."""
        return dict(Counter(problem.kind for problem in self.items))

    def files(self) -> int:
        """Number of distinct files with at least one problem."""
        return len({problem.file for problem in self.items})

    def summary(self) -> dict:
        """What a sidecar stores: counts, and the first problems verbatim."""
        return {
            "count": len(self.items),
            "files": self.files(),
            "by_kind": self.counts(),
            "listed": [problem.to_dict() for problem in self.items[:MAX_LISTED]],
        }
