"""The feature table as a file: CSV, JSON Lines or Parquet, for ``sae-atlas export table`` and
``GET /api/features?format=…``.

Text formats are encoded a chunk of rows at a time, so an HTTP download streams and a file is
written without holding its text; Parquet is written whole (it is a few megabytes at 49k rows).
A file is always written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from sae_atlas import layout

FORMATS = ("csv", "jsonl", "parquet")
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
CHUNK_ROWS = 10_000


def format_of(path: Path) -> str:
    """The format a file name asks for, from its suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    chosen = {"ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if chosen not in FORMATS:
        raise ValueError(f"{path}: unknown table format {suffix!r}; use .csv, .jsonl or .parquet")
    return chosen


# OWASP's CSV injection guidance: a cell a spreadsheet would read as a formula starts with one of
# these; such a cell is written with a leading apostrophe, which spreadsheets show as text. Cells that
# already start with an apostrophe get one more, so that :func:`read` can undo the escape exactly.
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


def encode(frame: pl.DataFrame, format: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[bytes]:
    """``frame`` encoded in ``format``, a chunk at a time (one chunk for Parquet). CSV cells that
    a spreadsheet would evaluate as formulas are escaped (:data:`FORMULA_START`)."""
    if format == "parquet":
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd")
        yield buffer.getvalue()
        return
    for start in range(0, max(frame.height, 1), chunk_rows):
        chunk = frame.slice(start, chunk_rows)
        if format == "csv":
            yield escape_formulas(chunk).write_csv(include_header=start == 0).encode("utf-8")
        elif chunk.height:
            yield chunk.write_ndjson().encode("utf-8")


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
    chosen = format_of(path)
    if chosen == "parquet":
        return pl.read_parquet(path)
    if chosen == "csv":
        return unescape_formulas(pl.read_csv(path, schema=schema))
    return pl.read_ndjson(path, schema=schema)
