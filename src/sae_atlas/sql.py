"""``sae-atlas sql``: DuckDB over an output directory, one read-only view per master file.

Views are named after their files (``features``, ``explanation_embeddings``,
``activation_examples``, ``activation_embeddings``, ``activation_example_similarity``) plus the stage
table ``scores``, and ``labels`` (every label row, when people have labelled). Only a single SELECT
(or WITH … SELECT) statement is accepted, and the connection
can read the views' files and nothing else: nothing can be written, attached, installed, or read
from elsewhere on the machine or the network through this door.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from sae_atlas import layout
from sae_atlas.label_store import LabelStore

VIEWS = {layout.view_name(name): name for name in (*layout.MASTER_FILES, layout.SCORES)}


class SqlError(ValueError):
    """The statement is not a single SELECT, or DuckDB rejected it; the message is one line."""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(output_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view over each Parquet file present, locked down.

    Once the views exist, the connection may open those files and nothing else: no other file,
    glob or URL (``enable_external_access = false`` with the views' files as ``allowed_paths``),
    no extension installed or loaded, and the settings locked so a query cannot undo any of it.
    """
    output_dir = Path(output_dir).resolve()
    connection = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
    )
    allowed = []
    for view, name in VIEWS.items():
        path = output_dir / name
        if path.exists():
            connection.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet({_literal(str(path))})")
            allowed.append(str(path))
    # people's labels, read from their store read-only (every row ever written; see `labels`)
    labels = LabelStore(output_dir, read_only=True).history()
    if labels.height:
        connection.register("labels", labels.to_arrow())
    connection.execute(f"SET allowed_paths = [{', '.join(_literal(path) for path in allowed)}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
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
