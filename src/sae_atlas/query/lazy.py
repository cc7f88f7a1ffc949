"""A value loaded on first use, once, however many threads ask for it together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class Lazy(Generic[Value]):
    """``load()`` run once: by the first caller of :meth:`get` (the others wait for it), or in a
    background thread from :meth:`start`. A failed load is kept as :attr:`error` (a one-line
    reason) and gives None from then on: a damaged optional file degrades a query, it never
    breaks every later one."""

    def __init__(self, load: Callable[[], Value], *, name: str = "lazy"):
        self._load = load
        self._name = name
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._value: Value | None = None
        self.error: str | None = None

    def _run(self) -> None:
        try:
            self._value = self._load()
        except Exception as error:  # kept and reported, see the class docstring
            self._value = None
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self._loaded.set()

    def start(self) -> None:
        """Begin loading in a background thread (once); :meth:`get` waits for it."""
        with self._lock:
            if self._thread is None and not self._loaded.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def get(self, *, wait: bool = True) -> Value | None:
        """The value; with ``wait=False``, None until it is loaded (starting the load if needed)."""
        if not self._loaded.is_set():
            if not wait:
                self.start()
                return None
            with self._lock:
                if self._thread is None and not self._loaded.is_set():
                    self._run()
            self._loaded.wait()
        return self._value

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()
