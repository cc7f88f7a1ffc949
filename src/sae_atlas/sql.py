"""``sae-atlas sql``: DuckDB over an output directory, one read-only view per master file.

Views are named after their files (``features``, ``explanation_embeddings``,
``activation_examples``, ``activation_embeddings``, ``activation_example_similarity``) plus the stage
table ``scores``. Only a single SELECT (or WITH … SELECT) statement is accepted: nothing can be
written, attached or installed through this door.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from sae_atlas import layout

VIEWS = {layout.view_name(name): name for name in (*layout.MASTER_FILES, layout.SCORES)}


class SqlError(ValueError):
    """The statement is not a single SELECT, or DuckDB rejected it; the message is one line."""


def connect(output_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view over each Parquet file present."""
    output_dir = Path(output_dir)
    connection = duckdb.connect(":memory:")
    for view, name in VIEWS.items():
        path = output_dir / name
        if path.exists():
            literal = str(path).replace("'", "''")
            connection.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{literal}')")
    return connection


def run_sql(output_dir: str | Path, query: str) -> pl.DataFrame:
    """Run one SELECT statement over the views of ``output_dir``."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as error:
        raise SqlError(str(error).splitlines()[0]) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(statement.type.name for statement in statements) or "nothing"
        raise SqlError(f"only a single SELECT statement is allowed (got {kinds})")
    connection = connect(output_dir)
    try:
        return connection.sql(query).pl()
    except duckdb.Error as error:
        raise SqlError(str(error).splitlines()[0]) from None
    finally:
        connection.close()
