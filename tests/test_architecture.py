"""The declarations themselves: stages, the metric registry, JSON twins, and the import layering."""

from __future__ import annotations

import ast
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from sae_atlas import layout, metrics
from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline, PipelineError, order_stages
from sae_atlas.serve.pages import twins
from sae_atlas.stage import Plan, Product, Skip, Stage
from sae_atlas.stages import REGISTERED

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sae_atlas"


# -- stages ---------------------------------------------------------------------------------------


def test_every_registered_stage_reads_only_what_an_earlier_stage_writes():
    ordered = order_stages(REGISTERED)
    position = {stage.name: index for index, stage in enumerate(ordered)}
    for stage in ordered:
        for name in (*stage.reads, *stage.optional_reads):
            assert name in position, (stage.name, name)
            assert position[name] < position[stage.name], (stage.name, name)
    outputs = [stage.output for stage in REGISTERED] + [name for stage in REGISTERED for name in stage.extra_outputs]
    assert len(outputs) == len(set(outputs)), "two stages write the same file"
    assert {stage.output for stage in REGISTERED} >= set(layout.MASTER_FILES)


def test_declared_config_keys_exist():
    from sae_atlas.config import AtlasConfig

    fields = AtlasConfig.model_fields
    for stage in REGISTERED:
        for key in stage.config:
            section, _, rest = key.partition(".")
            assert section in fields, (stage.name, key)
            if rest:
                model = fields[section].annotation
                model = next((arg for arg in getattr(model, "__args__", (model,)) if arg is not type(None)), model)
                assert rest in model.model_fields, (stage.name, key)


def test_bad_declarations_are_refused():
    def plan(context):
        raise AssertionError("never planned")

    with pytest.raises(PipelineError, match="which no stage writes"):
        order_stages([Stage("a", "a.parquet", 1, plan, reads=("nowhere",))])
    with pytest.raises(PipelineError, match="cycle"):
        order_stages([Stage("a", "a.parquet", 1, plan, reads=("b",)), Stage("b", "b.parquet", 1, plan, reads=("a",))])
    with pytest.raises(PipelineError, match="two stages"):
        order_stages([Stage("a", "a.parquet", 1, plan), Stage("a", "b.parquet", 1, plan)])


# A toy stage, declared the way a stage module declares one: the number of explanations per explainer.
CALLS: list[str] = []


def explainer_counts_plan(context):
    text_length = context.config.sampling.window  # any config key it declares

    def execute(problems):
        CALLS.append("execute")
        table = (
            context.read("features", ["llm_explainer"])
            .group_by(pl.col("llm_explainer").cast(pl.String))
            .len()
            .with_columns(window=pl.lit(text_length))
            .sort("llm_explainer")
        )
        return Product(data=table, rows=table.height, statistics={"explainers": table.height})

    return Plan(key={}, execute=execute)


TOY = Stage(
    name="explainer_counts",
    output="stages/explainer_counts.parquet",
    version=1,
    plan=explainer_counts_plan,
    reads=("features",),
    config=("sampling.window",),
)


@pytest.mark.slow
def test_a_new_stage_runs_fingerprints_and_skips_without_touching_the_runner(small_corpus, embedder, tmp_path):
    import shutil

    corpus = shutil.copytree(small_corpus.root, tmp_path / "corpus", ignore=shutil.ignore_patterns("master"))
    config = load_config(corpus / "sae-atlas.toml")
    stages = (*REGISTERED, TOY)
    CALLS.clear()
    report = Pipeline(config, embedder=embedder, stages=stages).run()
    statuses = {outcome.name: outcome.status for outcome in report.outcomes}
    assert statuses["explainer_counts"] == "ran" and CALLS == ["execute"]
    names = [outcome.name for outcome in report.outcomes]
    assert names.index("explainer_counts") > names.index("features")  # ordered by what it reads
    table = pl.read_parquet(config.output_dir / TOY.output)
    assert table["len"].sum() == pl.read_parquet(config.output_dir / layout.FEATURES).height
    sidecar = layout.read_sidecar(config.output_dir / TOY.output)
    assert sidecar["stage"] == "explainer_counts" and sidecar["inputs"]["config"] == {"sampling.window": 32}

    again = Pipeline(config, embedder=embedder, stages=stages).run()
    assert {outcome.name: outcome.status for outcome in again.outcomes}["explainer_counts"] == "unchanged"
    assert CALLS == ["execute"]

    # A config key it declared changes: it runs again (and so does stage 4, which reads the same key).
    text = (corpus / "sae-atlas.toml").read_text()
    (corpus / "sae-atlas.toml").write_text(text + "\n[sampling]\nwindow = 16\n")
    changed = Pipeline(load_config(corpus / "sae-atlas.toml"), embedder=embedder, stages=stages).run(
        only=["explainer_counts"]
    )
    assert [outcome.status for outcome in changed.outcomes] == ["ran"] and CALLS == ["execute", "execute"]
    assert pl.read_parquet(config.output_dir / TOY.output)["window"].unique().to_list() == [16]


def test_a_stage_may_only_read_what_it_declared(small_corpus, embedder, tmp_path):
    def plan(context):
        def execute(problems):
            context.read("scores")  # not declared
            raise AssertionError("unreachable")

        return Plan(key={}, execute=execute)

    sneaky = Stage("sneaky", "stages/sneaky.parquet", 1, plan, reads=("features",))
    config = load_config(small_corpus.config)
    config.output_dir = tmp_path / "out"
    pipeline = Pipeline(config, embedder=embedder, stages=(*REGISTERED, sneaky))
    pipeline.run(only=["scores", "explanation_embeddings", "features"])
    with pytest.raises(PipelineError, match="without declaring it"):
        pipeline.run(only=["sneaky"])


def test_a_stage_may_only_read_the_config_keys_it_declared(small_corpus, embedder, tmp_path):
    """A config key a stage reads but did not declare would change its output without changing
    its fingerprint: reading one fails, like an undeclared stage output."""
    seen = []

    def plan(context):
        seen.append(context.config.decoder.top_k)  # declared
        seen.append(context.config.sampling)  # declared whole
        context.config.decoder.path  # noqa: B018 - not declared

        return Plan(key={}, execute=lambda problems: None)

    sneaky = Stage("sneaky", "stages/sneaky.parquet", 1, plan, config=("decoder.top_k", "sampling"))
    config = load_config(small_corpus.config)
    config.output_dir = tmp_path / "out"
    pipeline = Pipeline(config, embedder=embedder, stages=(*REGISTERED, sneaky))
    with pytest.raises(PipelineError, match=r"reads config key 'decoder\.path' without declaring it"):
        pipeline.run(only=["sneaky"])
    assert seen == [config.decoder.top_k, config.sampling]


def test_a_stage_that_skips_keeps_going(small_corpus, embedder, tmp_path):
    def plan(context):
        raise Skip("nothing to do here")

    idle = Stage("idle", "stages/idle.parquet", 1, plan)
    config = load_config(small_corpus.config)
    config.output_dir = tmp_path / "out"
    report = Pipeline(config, embedder=embedder, stages=(*REGISTERED, idle)).run(only=["idle", "scores"])
    assert {outcome.name: (outcome.status, outcome.reason) for outcome in report.outcomes}["idle"] == (
        "skipped",
        "nothing to do here",
    )


def test_a_streamed_stage_writes_its_outputs_together_or_not_at_all(small_corpus, embedder, tmp_path):
    """Parts feed the output and an extra output in step, with a scratch directory that goes away;
    a stage that finds its input unusable halfway publishes nothing and removes its old outputs."""
    from sae_atlas.stage import Parts, Unusable

    seen: dict = {}

    def plan(context):
        fail = context.config.sampling.per_quantile == 1

        def execute(problems):
            scratch = context.scratch()
            (scratch / "spilled").write_text("temporary")
            seen["scratch"] = scratch

            def parts():
                for start in range(0, 30, 10):
                    if fail and start == 20:
                        raise Unusable("the input turned out unusable halfway")
                    ids = pl.DataFrame({"feature_id": range(start, start + 10)}, schema={"feature_id": pl.UInt32})
                    yield Parts(ids, {"stages/squares.parquet": ids.with_columns(square=pl.col("feature_id") ** 2)})

            return Product(data=parts(), rows=None, statistics={})

        return Plan(key={"fail": fail}, execute=execute)

    counted = Stage(
        "counted",
        "stages/counted.parquet",
        1,
        plan,
        config=("sampling.per_quantile",),
        extra_outputs=("stages/squares.parquet",),
    )
    config = load_config(small_corpus.config)
    config.output_dir = tmp_path / "out"
    report = Pipeline(config, embedder=embedder, stages=(*REGISTERED, counted)).run(only=["counted"])
    assert report.outcomes[0].status == "ran"
    assert pl.read_parquet(config.output_dir / "stages/counted.parquet").height == 30
    squares = pl.read_parquet(config.output_dir / "stages/squares.parquet")
    assert squares["square"].to_list() == [value**2 for value in range(30)]
    assert not seen["scratch"].exists()

    config.sampling.per_quantile = 1
    report = Pipeline(config, embedder=embedder, stages=(*REGISTERED, counted)).run(only=["counted"])
    outcome = report.outcomes[0]
    assert (outcome.status, outcome.reason, outcome.removed) == (
        "skipped",
        "the input turned out unusable halfway",
        True,
    )
    assert not (config.output_dir / "stages/counted.parquet").exists()
    assert not (config.output_dir / "stages/squares.parquet").exists()
    assert not [path for path in config.output_dir.rglob("*") if ".tmp-" in path.name]


# -- metrics and the HTTP API -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(small_run, embedder):
    from sae_atlas import Atlas
    from sae_atlas.serve.app import create_app

    return TestClient(create_app(Atlas(small_run[0].output_dir, embedder=embedder)))


def test_metric_registry_and_openapi_schema_agree(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert list(components["FeatureRow"]["properties"]) == [
        "feature_id",
        "explainer",
        "explanation_text",
        "explanation_ok",
        *metrics.NAMES,
        "verdict",
        "causes",
        "label_stale",
    ]
    for metric in metrics.METRICS:
        assert components["FeatureRow"]["properties"][metric.name]["description"] == metric.description
    assert list(components["ScorerMetrics"]["properties"]) == ["scorer", *(m.name for m in metrics.SCORE_METRICS)]
    parameters = {parameter["name"] for parameter in schema["paths"]["/api/features"]["get"]["parameters"]}
    assert {f"{name}_{end}" for name in metrics.NAMES for end in ("min", "max")} <= parameters
    histogram = next(p for p in schema["paths"]["/api/histogram"]["get"]["parameters"] if p["name"] == "metric")
    assert histogram["schema"]["enum"] == list(metrics.NAMES)
    sort = next(p for p in schema["paths"]["/api/features"]["get"]["parameters"] if p["name"] == "sort")
    assert set(metrics.NAMES) <= set(sort["schema"]["enum"])


def test_every_metric_is_in_the_table_the_forms_and_the_feature_payload(client, small_run):
    rows = client.get("/api/features", params={"limit": 5}).json()["rows"]
    assert all(set(metrics.NAMES) <= set(row) for row in rows)
    html = client.get("/").text
    for metric in metrics.METRICS:
        assert f'name="{metric.name}_min"' in html and f'name="{metric.name}_max"' in html
    record = client.get(f"/api/features/{rows[0]['feature_id']}").json()
    for item in record["explanations"]:
        assert {metric.name for metric in metrics.SCORE_METRICS} <= set(item["metrics"][0])


def test_intruder_is_a_visible_metric(tmp_path, embedder):
    import orjson

    from sae_atlas import Atlas
    from sae_atlas.serve.app import create_app
    from sae_atlas.synth import SynthOptions, synthesize

    corpus = synthesize(
        tmp_path / "corpus", SynthOptions(features=64, explained=6, explainers=1, scorers=1, prompts=40, ctx=32)
    )
    # An intruder directory in the one run: delphi's IntruderResult records.
    run = next((corpus.root / "raw").glob("*_e-*_s"))
    latent = sorted((run / "scores" / "fuzz").glob("*.txt"))[0].name
    records = [
        {"interpretation": "x", "sample": {"examples": []}, "prediction": 1, "correct_index": 1, "correct": True},
        {"interpretation": "y", "sample": {"examples": []}, "prediction": 0, "correct_index": 2, "correct": False},
        {"interpretation": "z", "sample": {"examples": []}, "prediction": 3, "correct_index": 3, "correct": True},
        {"interpretation": "", "sample": None, "prediction": 0, "correct_index": -1, "correct": False},
    ]
    (run / "scores" / "intruder").mkdir()
    (run / "scores" / "intruder" / latent).write_bytes(orjson.dumps(records))
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run()
    atlas = Atlas(config.output_dir, embedder=embedder)
    feature_id = int(latent.split("latent")[1].removesuffix(".txt"))
    row = atlas.features(filters={"intruder": (0.5, None)}, limit=None)
    assert row["feature_id"].to_list() == [feature_id]
    assert row["intruder"].to_list() == [pytest.approx(2 / 3)]
    metrics_of = atlas.feature(feature_id)["explanations"][0]["metrics"][0]
    assert metrics_of["intruder"] == pytest.approx(2 / 3)
    client = TestClient(create_app(atlas))
    page = client.get(f"/features/{feature_id}").text
    assert "intruder score" in page and "0.67" in page


def test_every_html_page_has_a_json_twin_with_the_same_data(client):
    html_routes = {
        route.path
        for route in client.app.routes
        if getattr(route, "response_class", None) is not None
        and route.response_class.__name__ == "HTMLResponse"
        and not route.path.startswith("/docs")
    }
    assert html_routes == set(twins())
    api_paths = set(client.get("/openapi.json").json()["paths"])
    assert set(twins().values()) <= api_paths
    rows = client.get("/api/features", params={"limit": 3, "sort": "fuzz", "order": "desc"}).json()["rows"]
    page = client.get("/", params={"limit": 3, "sort": "fuzz", "order": "desc"}).text
    assert 'rel="alternate" type="application/json" href="/api/features?limit=3&amp;sort=fuzz&amp;order=desc"' in page
    assert all(row["explanation_text"].replace('"', "&#34;") in page or row["explanation_text"] in page for row in rows)
    feature_id = rows[0]["feature_id"]
    assert f'href="/api/features/{feature_id}"' in client.get(f"/features/{feature_id}").text
    plots = client.get("/api/plots", params={"x": "fuzz", "y": "detection"}).json()
    assert plots["scatter"]["x"] == "fuzz" and plots["scatter"]["shown"] > 0
    assert 'href="/api/plots?x=fuzz&amp;y=detection"' in client.get("/plots?x=fuzz&y=detection").text


def test_pages_and_api_refuse_the_same_values_with_the_same_message(client):
    for params in ({"fuzz_min": "nan"}, {"limit": "0"}, {"sort": "nope"}, {"explainer": "nobody"}, {"x": "1"}):
        api = client.get("/api/features", params=params)
        html = client.get("/", params=params)
        assert api.status_code == html.status_code == 422, params
        assert api.json()["detail"] in html.text.replace("&#39;", "'"), params
    redirect = client.get("/", params={"fuzz_min": "", "limit": "25"}, follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == "/?limit=25"


# -- a page and a format, each declared once ----------------------------------------------------------


class ToyQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field("hello", max_length=5)


class ToyResult(BaseModel):
    latents: int
    word: str


@pytest.fixture
def toy_template():
    """The toy page's template, where the package keeps templates (a page = data + declaration + template)."""
    from sae_atlas.serve.web import HERE

    path = HERE / "templates" / "toy.html"
    path.write_text(
        '{% extends "base.html" %}{% block content %}<h1>Toy</h1>{% if error %}<p class="error">{{ error }}</p>'
        "{% endif %}<p>{{ data.word }} × {{ data.latents }}</p>{% endblock %}"
    )
    yield
    path.unlink()


def test_a_page_declared_once_is_html_json_twin_nav_and_the_shared_422(small_run, embedder, monkeypatch, toy_template):
    from sae_atlas import Atlas
    from sae_atlas.serve import pages
    from sae_atlas.serve.app import create_app

    toy = pages.Page(
        "toy",
        "/api/toy",
        lambda atlas, query: {"latents": atlas.stats()["features"], "word": query.word},
        ToyResult,
        "A toy page.",
        query=lambda atlas: ToyQuery,
        path="/toy",
        template="toy.html",
        nav="Toy",
    )
    monkeypatch.setitem(pages.PAGES, "toy", toy)
    client = TestClient(create_app(Atlas(small_run[0].output_dir, embedder=embedder), prepare=False))
    latents = client.get("/api/stats").json()["features"]
    assert client.get("/api/toy", params={"word": "hi"}).json() == {"latents": latents, "word": "hi"}
    page = client.get("/toy", params={"word": "hi"})
    assert page.status_code == 200 and f"hi × {latents}" in page.text
    assert 'href="/api/toy?word=hi"' in page.text  # its JSON twin, linked
    assert '<a href="/toy">Toy</a>' in client.get("/").text  # in every page's navigation
    assert "/api/toy" in client.get("/openapi.json").json()["paths"]
    refused_page, refused_api = client.get("/toy?word=toolong"), client.get("/api/toy?word=toolong")
    assert refused_page.status_code == refused_api.status_code == 422
    assert refused_api.json()["detail"] in refused_page.text  # the same one-line message, in the page
    assert "hello ×" in refused_page.text  # over the page's default view


def test_a_format_registered_once_is_in_the_api_the_download_links_and_the_cli(
    small_run, embedder, monkeypatch, tmp_path
):
    from typer.testing import CliRunner

    from sae_atlas import Atlas
    from sae_atlas.cli import app
    from sae_atlas.exports import tables
    from sae_atlas.serve.app import create_app

    def tsv(frame, chunk_rows):
        yield frame.select(pl.col(pl.String, pl.Int64, pl.UInt32)).write_csv(separator="\t").encode()

    renderer = tables.Renderer(
        "tsv",
        "TSV",
        "text/tab-separated-values",
        (".tsv",),
        tsv,
        lambda path, schema: pl.read_csv(path, separator="\t"),
        "tabs",
    )
    monkeypatch.setitem(tables.RENDERERS, "tsv", renderer)
    client = TestClient(create_app(Atlas(small_run[0].output_dir, embedder=embedder), prepare=False))
    download = client.get("/api/features", params={"format": "tsv", "limit": 2})
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/tab-separated-values")
    assert download.text.splitlines()[0].startswith("feature_id\texplainer")
    assert '/api/features?format=tsv" download>TSV</a>' in client.get("/").text
    result = CliRunner().invoke(app, ["export", "table", str(small_run[0].output_dir), "-o", str(tmp_path / "t.tsv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.tsv").read_text().startswith("feature_id\texplainer")


# -- imports ---------------------------------------------------------------------------------------

# The data path, bottom to top: a module may import modules of its own layer or below, never above.
LAYERS = [
    # foundations: the contract, the config, bookkeeping, registries
    {
        "problems",
        "config",
        "layout",
        "schema",
        "metrics",
        "devices",
        "score_methods",
        "scored_examples",
        "label_store",
        "engine",
    },
    # readers of the raw formats, and the synthetic corpus written in them
    {"sources", "synth"},
    # computation shared by stages and queries
    {"embedding", "embedding_models", "embedding_cache", "embedding_int8", "sampling", "vector_storage", "ray_engine"},
    # stages and their declaration
    {"stage", "stages"},
    # the runner
    {"pipeline"},
    # reading outputs back: the query layer (Atlas, its results and parameters, the comparison)
    {"query", "sql", "validate"},
    # interfaces: serving the query layer (API, pages), files for other tools, the command line
    {"serve", "exports", "cli", "__main__"},
]


def layer_of(module: str) -> int:
    top = module.removeprefix("sae_atlas.").split(".")[0]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"sae_atlas.{top} is in no layer of this test: place it")


def package_imports() -> dict[str, set[str]]:
    """Every sae_atlas module → the sae_atlas modules it imports (anywhere in it, lazily too)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_atlas"):
                imported.add(node.module)
                imported.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists()
                )
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("sae_atlas"))
        graph[module] = {name for name in imported if name != module and name != "sae_atlas"}
    return graph


def test_no_module_imports_one_above_it_in_the_data_path():
    upward = []
    for module, imported in package_imports().items():
        if module == "sae_atlas":  # the package facade exposes Atlas lazily
            continue
        for name in imported:
            if layer_of(name) > layer_of(module):
                upward.append(f"{module} imports {name}")
    assert upward == []


def test_no_import_cycles():
    graph = package_imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1  # on the current path
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 1:
                cycles.append(" → ".join([*path[path.index(name) :], name]))
            elif name not in state and name in graph:
                visit(name, [*path, name])
        state[module] = 2  # done

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_readers_of_outputs_never_import_the_runner():
    graph = package_imports()
    readers = ("sae_atlas.query.atlas", "sae_atlas.validate", "sae_atlas.sql", "sae_atlas.query.summary")
    for module in (*readers, "sae_atlas.serve.app"):
        assert "sae_atlas.pipeline" not in graph[module], module


def test_no_function_is_longer_than_80_lines():
    """A function that does not fit on a screen does several things: split it where they part."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                )
    assert long == []


def test_the_query_layer_stays_small():
    assert len((PACKAGE / "query" / "atlas.py").read_text().splitlines()) < 450
