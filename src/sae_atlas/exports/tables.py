"""The feature table as a file, in every registered format: ``sae-atlas export table -o FILE``,
``GET /api/features?format=…`` and the index page's download links all come from :data:`RENDERERS`.

A format is one :class:`Renderer` registered by name (:func:`register`): how a table is encoded (a
chunk of rows at a time, so an HTTP download streams and a file is written without holding its
text), how it is read back, its media type and file suffixes. The API's ``format`` parameter, the
download links, the CLI's suffixes and its help are derived from the registry, so a new format is
one registration. A file is always written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sae_atlas import layout

CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class Renderer:
    """One file format of the feature table."""

    name: str  # the API's ``format`` value
    label: str  # what a download link says
    media_type: str
    suffixes: tuple[str, ...]  # file suffixes that ask for it, the first one canonical (".csv")
    encode: Callable[[pl.DataFrame, int], Iterator[bytes]]  # (table, chunk rows) → its bytes in pieces
    read: Callable[[Path, pl.Schema], pl.DataFrame]  # the inverse of encode, for a file
    description: str


RENDERERS: dict[str, Renderer] = {}


def register(renderer: Renderer) -> Renderer:
    """Add a format (replacing one of the same name)."""
    RENDERERS[renderer.name] = renderer
    return renderer


def formats() -> tuple[str, ...]:
    """The registered formats' names, in registration order."""
    return tuple(RENDERERS)


def suffix_help() -> str:
    """The suffixes a table file may have, for messages and help: ".csv, .jsonl or .parquet"."""
    suffixes = [renderer.suffixes[0] for renderer in RENDERERS.values()]
    return ", ".join(suffixes[:-1]) + (f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0])


def format_of(path: Path) -> str:
    """The format a file name asks for, from its suffix."""
    suffix = Path(path).suffix.lower()
    for renderer in RENDERERS.values():
        if suffix in renderer.suffixes:
            return renderer.name
    raise ValueError(f"{path}: unknown table format {suffix.lstrip('.')!r}; use {suffix_help()}")


def encode(frame: pl.DataFrame, format: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[bytes]:
    """``frame`` encoded in ``format``, a chunk at a time."""
    return RENDERERS[format].encode(frame, chunk_rows)


def write(frame: pl.DataFrame, path: Path) -> str:
    """Write ``frame`` to ``path`` in the format its suffix names (atomically); returns the format."""
    chosen = format_of(path)
    path = Path(path)
    layout.refuse_output_files(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = layout.temporary_path(path)
    try:
        with temporary.open("wb") as handle:
            for part in encode(frame, chosen):
                handle.write(part)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return chosen


def read(path: Path, schema: pl.Schema) -> pl.DataFrame:
    """A table written by :func:`write`, read back with the schema it was written from."""
    return RENDERERS[format_of(path)].read(Path(path), schema)


# -- the formats ---------------------------------------------------------------------------------

# OWASP's CSV injection guidance: a cell a spreadsheet would read as a formula starts with one of
# these; such a cell is written with a leading apostrophe, which spreadsheets show as text. Cells that
# already start with an apostrophe get one more, so that reading it back can undo the escape exactly.
FORMULA_START = r"^[=+\-@\t\r']"


def escape_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    """Every text cell that a spreadsheet would evaluate, prefixed with ``'`` (CSV only)."""
    texts = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    return frame.with_columns(
        pl.when(pl.col(name).str.contains(FORMULA_START)).then("'" + pl.col(name)).otherwise(pl.col(name)).alias(name)
        for name in texts
    )


def unescape_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    """The inverse of :func:`escape_formulas`."""
    texts = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    return frame.with_columns(
        pl.when(pl.col(name).str.starts_with("'")).then(pl.col(name).str.slice(1)).otherwise(pl.col(name)).alias(name)
        for name in texts
    )


def _csv(frame: pl.DataFrame, chunk_rows: int) -> Iterator[bytes]:
    for start in range(0, max(frame.height, 1), chunk_rows):
        chunk = frame.slice(start, chunk_rows)
        yield escape_formulas(chunk).write_csv(include_header=start == 0).encode("utf-8")


def _jsonl(frame: pl.DataFrame, chunk_rows: int) -> Iterator[bytes]:
    for start in range(0, frame.height, chunk_rows):
        yield frame.slice(start, chunk_rows).write_ndjson().encode("utf-8")


def _parquet(frame: pl.DataFrame, chunk_rows: int) -> Iterator[bytes]:
    buffer = io.BytesIO()  # one piece: a few megabytes at 49k rows
    frame.write_parquet(buffer, compression="zstd")
    yield buffer.getvalue()


register(
    Renderer(
        "csv",
        "CSV",
        "text/csv; charset=utf-8",
        (".csv",),
        _csv,
        lambda path, schema: unescape_formulas(pl.read_csv(path, schema=schema)),
        "comma-separated values, formula-like cells escaped",
    )
)
register(
    Renderer(
        "jsonl",
        "JSON Lines",
        "application/x-ndjson",
        (".jsonl", ".ndjson"),
        _jsonl,
        lambda path, schema: pl.read_ndjson(path, schema=schema),
        "one JSON object per line",
    )
)
register(
    Renderer(
        "parquet",
        "Parquet",
        "application/vnd.apache.parquet",
        (".parquet", ".pq"),
        _parquet,
        lambda path, schema: pl.read_parquet(path),
        "Apache Parquet, zstd",
    )
)
