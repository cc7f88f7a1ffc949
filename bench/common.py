"""Shared helpers for the benchmarks: the reference-scale corpus, measured subprocesses, and the
section of docs/benchmarks.md each benchmark owns."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOC = ROOT / "docs" / "benchmarks.md"
CLI = [sys.executable, "-m", "sae_atlas"]
# DESIGN.md §6: the study's own run.
REFERENCE = {
    "features": 16384,
    "explained": 824,
    "explainers": 3,
    "scorers": 3,
    "prompts": 24571,
    "ctx": 127,
    "d-model": 3584,
    "seed": 0,
}


def reference_corpus(name: str = "reference", **overrides) -> Path:
    """The reference-scale synthetic corpus under bench/out (built once, reused while its options hold)."""
    options = {**REFERENCE, **overrides}
    root = OUT / name
    marker = root / "synth-options.json"
    if marker.exists() and orjson.loads(marker.read_bytes()) == options:
        return root
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    arguments = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    started = time.perf_counter()
    subprocess.run([*CLI, "synth", str(root), *arguments], check=True, stdout=subprocess.DEVNULL)
    print(f"built {root} in {time.perf_counter() - started:.0f} s", flush=True)
    marker.write_bytes(orjson.dumps(options))
    return root


def measured(command: list[str], **kwargs) -> tuple[float, int]:
    """Run ``command``; return its wall seconds and peak resident memory in bytes (this child only)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return wall, usage.ru_maxrss * 1024


def machine() -> str:
    """One line describing the machine the figures come from."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def update_section(name: str, body: str) -> None:
    """Replace the ``name`` section of docs/benchmarks.md (between its markers) with ``body``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = f"_Measured {dt.date.today().isoformat()} on: {machine()}._\n\n"
    block = f"{start}\n{stamp}{body.strip()}\n{end}"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
