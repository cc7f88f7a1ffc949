"""sae-atlas sql: DuckDB views over the master files, SELECT only."""

from __future__ import annotations

import polars as pl
import pytest

from sae_atlas.sql import SqlError, run_sql


def test_views_over_every_file(small_run):
    outputs = small_run[0].output_dir
    counts = run_sql(
        outputs,
        """
        SELECT (SELECT count(*) FROM features) AS features,
               (SELECT count(*) FROM activation_examples) AS examples,
               (SELECT count(*) FROM activation_embeddings) AS embedded,
               (SELECT count(*) FROM scores) AS scores""",
    ).row(0, named=True)
    assert counts["features"] == pl.read_parquet(outputs / "features.parquet").height
    assert (
        counts["examples"] == pl.scan_parquet(outputs / "activation_examples.parquet").select(pl.len()).collect().item()
    )
    agreement = run_sql(
        outputs,
        """
        WITH pairs AS (SELECT feature_id, unnest(semantic_similarity) AS s FROM features)
        SELECT feature_id, avg(s.cosine_similarity) AS agreement FROM pairs GROUP BY 1 ORDER BY 2 LIMIT 3""",
    )
    assert agreement.columns == ["feature_id", "agreement"] and agreement.height == 3


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "only a single SELECT"),
        ("CREATE TABLE t AS SELECT 1", "only a single SELECT"),
        ("SELECT 1; SELECT 2", "only a single SELECT"),
        ("ATTACH 'other.db'", "only a single SELECT"),
        ("SELECT * FROM no_such_table", "no_such_table"),
        ("SELEC 1", "syntax error"),
    ],
)
def test_only_one_select_is_accepted(small_run, query, fragment):
    with pytest.raises(SqlError, match=fragment):
        run_sql(small_run[0].output_dir, query)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM sniff_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('{outside}')",
        "SELECT * FROM read_csv('https://example.com/data.csv')",
        "SELECT * FROM sqlite_scan('{outside}', 't')",
        "SELECT * FROM read_json('~/.bashrc')",
    ],
)
def test_no_file_outside_the_outputs_can_be_read(small_run, tmp_path, monkeypatch, query):
    # DuckDB installs extensions under $HOME: point it at a fresh directory to see that nothing is.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    outside = tmp_path / "elsewhere.parquet"
    pl.DataFrame({"secret": [42]}).write_parquet(outside)
    with pytest.raises(SqlError) as refused:
        run_sql(small_run[0].output_dir, query.format(outside=outside))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "home").exists()  # no ~/.duckdb/extensions created


def test_the_lockdown_cannot_be_lifted_from_a_query(small_run):
    with pytest.raises(SqlError, match=r"locked|only a single SELECT"):
        run_sql(small_run[0].output_dir, "SET enable_external_access = true")
    # and the views still work under it, also a file of the outputs read directly
    outputs = small_run[0].output_dir
    direct = run_sql(outputs, f"SELECT count(*) AS n FROM read_parquet('{outputs / 'features.parquet'}')")
    assert direct["n"][0] == pl.read_parquet(outputs / "features.parquet").height
