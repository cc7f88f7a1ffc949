"""The diagnosis stages at scale: activation patterns and explanation diagnosis over 16,384 and
131,072 latents, every one explained by 3 explainers and scored by 3 scorers (8 times the study's
16,384 explained at 131k: an upper bound).

    python bench/diagnosis.py                 # 16,384 and 131,072 latents

The inputs are a synth run of 512 latents (bench/labels.py's base run) tiled to the width, feature
ids shifted per copy: the stages' cost depends on how many examples, tokens and explanations they
read. Each width runs in a fresh process: read the inputs (the floor: what any stage reading them
pays), then the two stages' pure functions; peak RSS of that process. Targets (the diagnosis issue):
< 30 s at reference scale besides embedding claims, < 5 min and < 4 GiB at 131k. Writes the
"diagnosis" section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, gib, update_section
from labels import BASE_LATENTS, base_run

TILED = (
    "stages/sampled_examples.parquet",
    "activation_example_similarity.parquet",
    "features.parquet",
    "stages/scores.parquet",
)


EXPLAINED_TABLES = ("features.parquet", "stages/scores.parquet")


def tiled(base: Path, features: int, explained: int) -> Path:
    """``base`` tiled to ``features`` latents, of which the first ``explained`` are explained."""
    output = OUT / f"diagnosis-{features}-{explained}"
    if (output / "stages/scores.parquet").exists():
        return output
    for name in TILED:
        width = explained if name in EXPLAINED_TABLES else features
        table = pq.read_table(base / name)
        column = table.schema.get_field_index("feature_id")
        parts = [
            table.set_column(
                column,
                "feature_id",
                pa.compute.add(table["feature_id"], pa.scalar(copy * BASE_LATENTS, table["feature_id"].type)),
            )
            for copy in range(width // BASE_LATENTS)
        ]
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(parts), output / name)
    (output / "stages").mkdir(exist_ok=True)
    pq.write_table(pq.read_table(base / "stages/prompts.parquet"), output / "stages/prompts.parquet")
    return output


def measure(output: Path) -> dict:
    """In this process: read the inputs, run both stages; seconds and peak RSS."""
    import resource

    import numpy as np
    import polars as pl

    from sae_atlas import layout
    from sae_atlas.stages.activation_patterns import activation_patterns
    from sae_atlas.stages.claims import corroborate, split_claims
    from sae_atlas.stages.diagnosis import CLASSIFIERS, SCORE_COLUMNS, diagnose, explanation_rows

    started = time.perf_counter()
    sampled = pl.read_parquet(
        output / layout.SAMPLED_EXAMPLES,
        columns=["feature_id", "prompt_id", "quantile", "max_activation", "activation_pairs"],
    )
    prompts = layout.read_prompt_tokens(output)
    coherence = pl.read_parquet(
        output / layout.ACTIVATION_SIMILARITY, columns=["feature_id", "mean_pairwise_similarity"]
    )
    features = pl.read_parquet(
        output / layout.FEATURES,
        columns=["feature_id", "llm_explainer", "explanation_text", "explanation_ok", "semantic_similarity"],
    )
    scores = (  # as the stage reads them: the classifiers' rows, the columns it uses
        pl.scan_parquet(output / layout.SCORES)
        .filter(pl.col("method").cast(pl.String).is_in(CLASSIFIERS))
        .select(SCORE_COLUMNS)
        .collect()
    )
    read = time.perf_counter() - started
    started = time.perf_counter()
    patterns = activation_patterns(sampled, prompts, coherence)
    patterns_seconds = time.perf_counter() - started
    # claims: split and aligned; unit vectors drawn at random stand in for the model's (encoding is
    # the embedding stage's cost, cached, and set apart by the target)
    started = time.perf_counter()
    explanations = explanation_rows(features)
    split = split_claims(explanations)
    vectors = np.random.default_rng(0).standard_normal((split.height, 384), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    claims = corroborate(split, vectors)
    claims_seconds = time.perf_counter() - started
    started = time.perf_counter()
    table = diagnose(explanations, scores, patterns, claims)
    diagnosis_seconds = time.perf_counter() - started
    return {
        "read": read,
        "patterns": patterns_seconds,
        "diagnosis": diagnosis_seconds,
        "claims": claims_seconds,
        "claim_rows": claims.height,
        "examples": sampled.height,
        "explanations": table.height,
        "latents": patterns.height,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
        return
    base = base_run()
    rows = []
    for features, explained in ((16384, 16384), (131072, 16384), (131072, 131072)):
        output = tiled(base, features, explained)
        environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
        result = subprocess.run(
            [sys.executable, __file__, "--measure", str(output)], capture_output=True, text=True, env=environment
        )
        if result.returncode:
            raise RuntimeError(result.stderr)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(features, explained, figures, flush=True)
        rows.append(
            f"| {features:,} | {explained:,} | {figures['examples']:,} | {figures['explanations']:,} "
            f"| {figures['read']:.1f} s "
            f"| {figures['patterns']:.1f} s | {figures['claims']:.1f} s ({figures['claim_rows']:,}) "
            f"| {figures['diagnosis']:.1f} s | {gib(figures['peak'])} |"
        )
    table = "\n".join(rows)
    body = f"""
`python bench/diagnosis.py`: the diagnosis stages' functions (`activation_patterns`, claims' `split_claims` and
`corroborate`, `diagnose`) in a fresh process per case, over a synth run of 512 latents (every one explained by 3
explainers, 3 scorers; about 12 sampled examples a latent) tiled to the width: the study's shape at 131,072
latents is the second row (16,384 explained); the last explains every latent, 8 times more.
The floor is reading the inputs, which any stage reading them pays.
Claims are split and aligned with random unit vectors (384 dimensions) standing in for the model's: encoding
them is the embedding cache's cost, which the targets set apart. Targets: < 30 s at reference scale besides
embedding the claims, < 5 min and < 4 GiB at 131k.

| latents | explained | examples | explanations | read (floor) | patterns | claims split, aligned | diagnosis | peak |
|---|---|---|---|---|---|---|---|---|
{table}
"""
    update_section("diagnosis", body)
    print(body)


if __name__ == "__main__":
    main()
