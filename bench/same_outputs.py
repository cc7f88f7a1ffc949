"""Compare two sae-atlas output directories file by file, by sorted contents.

    python bench/same_outputs.py OLD_DIR NEW_DIR [--tolerance 1e-6]

Used to show that a change moved no result: every Parquet file present in OLD_DIR (the embedding
cache excluded) must exist in NEW_DIR with the same columns (more may follow them: files grow at
the end) and the same rows once both are sorted by their flat columns. Categorical columns compare
by their strings. With ``--tolerance``, float
columns may differ by that much (e.g. embeddings from another engine); otherwise they must match
exactly. Exit code 0 when everything matches, 1 otherwise, with one line per difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

FLAT = (pl.Boolean, pl.String, pl.Categorical, pl.Enum)


def _normalised(frame: pl.DataFrame) -> pl.DataFrame:
    frame = frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))
    keys = [name for name, dtype in frame.schema.items() if dtype.is_numeric() or isinstance(dtype, FLAT)]
    return frame.sort(keys, nulls_last=True) if keys else frame


def _floats_close(left: pl.Series, right: pl.Series, tolerance: float) -> bool:
    while isinstance(left.dtype, pl.List | pl.Array):
        if left.list.len().to_list() != right.list.len().to_list():
            return False
        left, right = left.explode(), right.explode()
    if isinstance(left.dtype, pl.Struct):
        return all(
            _floats_close(left.struct.field(name), right.struct.field(name), tolerance) for name in left.struct.fields
        )
    if left.dtype.is_float():
        difference = (left.cast(pl.Float64) - right.cast(pl.Float64)).abs()
        same_nulls = (left.is_null() == right.is_null()).all()
        return bool(same_nulls and (difference.fill_null(0.0).fill_nan(0.0) <= tolerance).all())
    return left.equals(right)


def compare(old: Path, new: Path, tolerance: float = 0.0) -> list[str]:
    """One line per difference between the Parquet files of ``old`` and ``new``."""
    differences = []
    for path in sorted(old.rglob("*.parquet")):
        relative = path.relative_to(old)
        if relative.parts[0] == ".cache":
            continue
        other = new / relative
        if not other.exists():
            differences.append(f"{relative}: missing in {new}")
            continue
        columns = pl.read_parquet_schema(path).names()
        added = pl.read_parquet_schema(other).names()[len(columns) :]
        if pl.read_parquet_schema(other).names()[: len(columns)] != columns:
            differences.append(f"{relative}: columns {columns} != {pl.read_parquet_schema(other).names()}")
            continue
        if added:  # files may grow at the end (the contract's rule): the old columns must still match
            print(f"{relative}: added column(s) {', '.join(added)} not compared")
        left = _normalised(pl.read_parquet(path))
        right = _normalised(pl.read_parquet(other, columns=columns))
        if left.height != right.height:
            differences.append(f"{relative}: {left.height} rows != {right.height} rows")
            continue
        for name in left.columns:
            same = _floats_close(left[name], right[name], tolerance) if tolerance else left[name].equals(right[name])
            if not same:
                differences.append(f"{relative}: column {name!r} differs")
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    arguments = parser.parse_args()
    differences = compare(arguments.old, arguments.new, arguments.tolerance)
    for line in differences:
        print(line)
    if not differences:
        print(f"same outputs: {arguments.old} and {arguments.new}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
