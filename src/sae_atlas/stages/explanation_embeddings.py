"""Stage 2, ``explanation_embeddings``: one row per (feature, explainer) with its embedded text.

An explainer's explanation of a latent is the same in every run it explains (one run per scorer),
so the first source in config order that has it gives the row (``data_source``) and each distinct
text is embedded once. Sentinel explanations ("Explanation could not be parsed.", "No explanation found")
keep their row with a null embedding, so they never look similar to anything.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from sae_atlas import layout
from sae_atlas.engine import chunks
from sae_atlas.problems import Problems
from sae_atlas.schema import EXPLANATION_EMBEDDINGS
from sae_atlas.sources import delphi
from sae_atlas.stage import EmbedFunction, Plan, Product, Stage, StageContext, digest, fingerprint_files


def vectors_to_series(name: str, vectors: np.ndarray) -> pl.Series:
    """A (n, d) float32 matrix as a ``List(Float32)`` column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pl.Series(name, vectors).cast(pl.List(pl.Float32))


def build_explanation_embeddings(
    explanations: pl.DataFrame, *, sae_id: str, embed: EmbedFunction
) -> tuple[pl.DataFrame, dict]:
    """Embed the explanations of every (feature, explainer).

    ``explanations`` has ``data_source``, ``llm_explainer``, ``feature_id``, ``explanation_text`` and
    ``explanation_ok``, with sources in config order. Returns the table and its statistics.
    """
    ranked = explanations.with_row_index("_row").with_columns(
        _explainer_rank=pl.col("_row").min().over("llm_explainer")
    )
    keys = ["feature_id", "llm_explainer"]
    # The first source that gives a real explanation; a sentinel only when no source has one.
    first = ranked.sort([pl.col("explanation_ok").not_(), "_row"]).unique(keys, keep="first", maintain_order=True)
    differing = (
        ranked.group_by(keys).agg(pl.col("explanation_text").n_unique() > 1).get_column("explanation_text").sum()
    )
    usable = first.filter(pl.col("explanation_ok"))
    vectors = embed(usable["explanation_text"].to_list())
    with_vectors = usable.with_columns(vectors_to_series("embedding", vectors))
    sentinels = first.filter(~pl.col("explanation_ok")).with_columns(embedding=pl.lit(None, dtype=pl.List(pl.Float32)))
    table = (
        pl.concat([with_vectors, sentinels])
        .sort(["feature_id", "_explainer_rank"])
        .with_columns(sae_id=pl.lit(sae_id))
        .select([pl.col(name).cast(dtype) for name, dtype in EXPLANATION_EMBEDDINGS.items()])
    )
    statistics = {
        "rows": table.height,
        "features": table["feature_id"].n_unique(),
        "explainers": table["llm_explainer"].n_unique(),
        "sentinel_explanations": int((~table["explanation_ok"]).sum()),
        "texts_differing_between_sources": int(differing),
        "texts_embedded": len(usable),
    }
    return table, statistics


FILES_PER_TASK = 2000


def explanation_chunk(entries: list[delphi.LatentFile]) -> tuple[list[int], list[str], list]:
    """Read one chunk of explanation files: latents, texts and problems (run in a worker)."""
    problems = Problems()
    latents, texts = delphi.read_explanation_files(entries, problems)
    return latents, texts, problems.items


def read_all(context: StageContext, runs: list[delphi.DelphiRun], problems: Problems) -> pl.DataFrame:
    """Every run's explanations, the files read in chunks on the run's engine (a Neuronpedia
    source's were read when it was listed)."""
    tasks = [(run, chunk) for run in runs for chunk in chunks(run.explanations, FILES_PER_TASK)]
    read: dict[str, tuple[list[int], list[str]]] = {
        run.name: (list(run.texts), list(run.texts.values())) for run in runs
    }
    for (run, _), (latents, texts, found) in zip(
        tasks, context.map(explanation_chunk, [chunk for _, chunk in tasks]), strict=True
    ):
        problems.extend(found)
        read[run.name][0].extend(latents)
        read[run.name][1].extend(texts)
    return pl.concat(
        delphi.explanations_frame(run, *read[run.name]).with_columns(
            data_source=pl.lit(run.name, pl.String), llm_explainer=pl.lit(run.explainer, pl.String)
        )
        for run in runs
    )


def plan(context: StageContext) -> Plan:
    runs_with_files = context.listed_runs()
    files = [entry.path for run in runs_with_files for entry in run.explanations]
    files += [path for run in runs_with_files for path in run.batch_files]
    files += [run.path / "run_config.json" for run in runs_with_files]
    # Latents scored without an explanation file get a sentinel row: the score listing matters.
    scored = sorted(
        {(run.name, entry.latent) for run in runs_with_files for entries in run.scores.values() for entry in entries}
    )
    runs = context.runs_table()

    def execute(problems: Problems) -> Product:
        explanations = read_all(context, runs_with_files, problems)
        before = context.embedder.stats.snapshot()
        table, statistics = build_explanation_embeddings(
            explanations, sae_id=context.sae_id, embed=context.embed(STAGE.name)
        )
        work = context.embedder.stats.since(before)
        statistics |= {
            "model": context.config.embedding.model,
            "texts_from_cache": work["from_cache"],
            "texts_encoded": work["embedded"],
        }
        return Product(data=table, rows=table.height, statistics=statistics)

    return Plan(
        key={"inputs": fingerprint_files(files), "scored_latents": digest(scored), "runs": runs.to_dicts()},
        execute=execute,
        problems=context.discovery_problems("explanations"),
    )


STAGE = Stage(
    name="explanation_embeddings",
    output=layout.EXPLANATION_EMBEDDINGS,
    version=1,
    plan=plan,
    config=("sources", "embedding.model", "embedding.quantize"),
    description="every (feature, explainer)'s explanation text and its embedding",
)
