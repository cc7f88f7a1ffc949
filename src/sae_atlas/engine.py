"""Where independent pieces of a stage's work run: the engine.

A stage splits work that needs no shared state (parsing chunks of score files, reading
explanation files) into tasks of a module-level function, and asks the run's engine to ``map`` it.
Results come back in task order, whatever order the workers finish in, so outputs do not depend
on the engine or the number of workers. ``map_shared`` is the same with one large read-only
object every task reads (the decoder matrix): shipped once, not once per task.

:class:`LocalEngine` runs tasks on this machine's cores in a pool of worker processes. They are
spawned, not forked: a fork would inherit the threads of Polars' and torch's pools mid-state.
A map of one task, or with one worker, runs inline (no process start-up for small inputs).
:class:`sae_atlas.ray_engine.RayEngine` runs the same tasks on a Ray cluster, and batch embedding
on a Ray Data actor pool; the runner picks one from ``[execution]``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from sae_atlas.config import ExecutionConfig

Task = TypeVar("Task")
Shared = TypeVar("Shared")
Result = TypeVar("Result")


class Engine(Protocol):
    """Runs tasks of a module-level function; results in task order."""

    workers: int
    # Whether a stage should hand the embedder every missing text at once (one distributed batch
    # job) rather than chunk by chunk as it streams.
    batch_inference: bool

    def start(self) -> None:
        """Make sure the engine can run (connect to a cluster); raises before anything is written."""

    def map(self, function: Callable[[Task], Result], tasks: Sequence[Task]) -> Iterator[Result]: ...

    def map_shared(
        self, function: Callable[[Shared, Task], Result], shared: Shared, tasks: Sequence[Task], *, gpus: float = 0
    ) -> Iterator[Result]:
        """``function(shared, task)`` for each task, results in task order; ``shared`` is read-only.
        ``gpus``: what each task would like of a GPU, where the engine has any."""

    def text_encoder(self, execution: ExecutionConfig):
        """What encodes an embedder's missing texts here, or None for the embedder's own model."""

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
        self.batch_inference = False
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        pass

    def map(self, function: Callable[[Task], Result], tasks: Sequence[Task]) -> Iterator[Result]:
        if self.workers == 1 or len(tasks) <= 1:
            return map(function, tasks)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.map(function, tasks)

    def map_shared(
        self, function: Callable[[Shared, Task], Result], shared: Shared, tasks: Sequence[Task], *, gpus: float = 0
    ) -> Iterator[Result]:
        # Inline: the shared object is the biggest thing in memory; a process pool would copy it.
        return (function(shared, task) for task in tasks)

    def text_encoder(self, execution: ExecutionConfig) -> None:
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def chunks(items: Sequence[Task], size: int) -> list[Sequence[Task]]:
    """``items`` in consecutive slices of ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
