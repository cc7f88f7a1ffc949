"""Where independent pieces of a stage's work run: the engine.

A stage splits work that needs no shared state (parsing chunks of score files, reading
explanation files) into tasks of a module-level function, and asks the run's engine to ``map`` it.
Results come back in task order, whatever order the workers finish in, so outputs do not depend
on the engine or the number of workers.

:class:`LocalEngine` runs tasks on this machine's cores in a pool of worker processes. They are
spawned, not forked: a fork would inherit the threads of Polars' and torch's pools mid-state.
A map of one task, or with one worker, runs inline (no process start-up for small inputs).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Engine(Protocol):
    """Runs tasks of a module-level function; results in task order."""

    workers: int

    def map(self, function: Callable[[Task], Result], tasks: Sequence[Task]) -> Iterator[Result]: ...

    def close(self) -> None: ...


def available_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalEngine:
    """A pool of ``workers`` processes on this machine (default: one per available core), started
    on the first map that needs it and kept for the run."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or available_cores())
        self._pool: ProcessPoolExecutor | None = None

    def map(self, function: Callable[[Task], Result], tasks: Sequence[Task]) -> Iterator[Result]:
        if self.workers == 1 or len(tasks) <= 1:
            return map(function, tasks)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.map(function, tasks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def chunks(items: Sequence[Task], size: int) -> list[Sequence[Task]]:
    """``items`` in consecutive slices of ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
