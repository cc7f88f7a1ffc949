"""Bad input never crashes, leaks or goes unreported: every case of the hardening issue, through
the real command line.

The command runs as an ordinary user would: as root, without the capabilities that let root read
any file (``setpriv --bounding-set=-dac_override,-dac_read_search``), so a file made unreadable with
``chmod 000`` is unreadable to the run, as it is on a researcher's machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest

from sae_atlas import layout
from sae_atlas.synth import SynthOptions, synthesize
from sae_atlas.validate import validate

pytestmark = pytest.mark.slow

CORPUS = SynthOptions(features=512, explained=24, explainers=2, scorers=1, prompts=120, ctx=40, d_model=32, seed=3)
HOOK = "layers.30"


def ordinary_user() -> list[str]:
    """The prefix that runs a command without root's power to read anything."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``sae-atlas ARGS`` in its own process, as an ordinary user."""
    command = [*ordinary_user(), sys.executable, "-m", "sae_atlas", *map(str, args)]
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream and 'File "' not in stream, stream[-3000:]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embedder):
    """A corpus run once, so that later runs in copies of it reuse the embedding cache."""
    from sae_atlas.config import load_config
    from sae_atlas.pipeline import Pipeline

    corpus = synthesize(tmp_path_factory.mktemp("hardening") / "corpus", CORPUS)
    Pipeline(load_config(corpus.config), embedder=embedder).run()
    return corpus.root


@pytest.fixture
def corpus(pristine, tmp_path):
    root = Path(shutil.copytree(pristine, tmp_path / "corpus", symlinks=True))
    yield root
    for path in root.rglob("*"):  # let pytest clean up what a test made unreadable
        if not path.is_symlink():
            path.chmod(stat.S_IRWXU)


def said(output: str, path: Path, message: str) -> bool:
    """Whether one line of ``output`` names ``path`` and says ``message``."""
    return any(f"{path}" in line and message in line for line in output.splitlines())


def runs(root: Path) -> list[Path]:
    return sorted(path for path in (root / "raw").glob("*_e-*_s"))


def report(root: Path) -> dict:
    return orjson.loads((root / "master" / layout.RUN_REPORT).read_bytes())


def stage(root: Path, name: str) -> dict:
    return next(entry for entry in report(root)["stages"] if entry["stage"] == name)


# 1 and 2: unreadable files, directories where files should be, link loops, unreadable directories


def test_unreadable_files_and_wrong_kinds_of_entries_are_reported_and_the_rest_kept(corpus):
    first, second = runs(corpus)
    fuzz = sorted((first / "scores" / "fuzz").glob("*.txt"))
    fuzz[0].chmod(0)  # permission denied
    explanation = sorted((second / "explanations").glob("*.txt"))[0]
    explanation.chmod(0)
    (first / "run_config.json").unlink()
    (first / "run_config.json").mkdir()  # a directory where the run config should be
    loop = first / "scores" / "detection" / f"{HOOK}_latent500.txt"
    loop.symlink_to(loop.name)  # a link to itself: too many levels of symbolic links
    latent_directory = second / "scores" / "detection" / fuzz[1].name
    latent_directory.unlink()
    latent_directory.mkdir()  # a directory named like a score file
    (second / "scores" / "simulation").chmod(0)  # a method directory that cannot be listed
    (corpus / "raw" / "activation_examples" / "prompts.json").chmod(0)

    result = cli("run", corpus / "sae-atlas.toml")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert said(output, fuzz[0], "file cannot be read (permission denied)")
    assert said(output, explanation, "file cannot be read (permission denied)")
    assert said(output, first / "run_config.json", "file cannot be read (is a directory, not a file)")
    assert said(output, loop, "file cannot be read (a loop of symbolic links)")
    assert said(output, latent_directory, "is a directory, not a per-latent file")
    assert said(output, second / "scores" / "simulation", "directory cannot be listed (permission denied)")
    assert said(output, corpus / "raw" / "activation_examples" / "prompts.json", "cannot be read (permission denied)")

    scores = stage(corpus, "scores")
    assert scores["status"] == "ran" and scores["problems"]["count"] >= 4
    assert stage(corpus, "explanation_embeddings")["problems"]["count"] >= 1
    assert stage(corpus, "activation_examples")["status"] == "skipped"
    # nothing else lost: the other runs' files are all there
    table = pl.read_parquet(corpus / "master" / layout.SCORES)
    assert table.filter(pl.col("data_source").cast(pl.String) == second.name).height > 0

    strict = cli("run", corpus / "sae-atlas.toml", "--strict", "--force")
    no_traceback(strict)
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1 and "(--strict)" in strict.stderr


# 3: activation input that gives nothing


@pytest.mark.parametrize(
    "damage",
    ["prompts truncated", "prompts missing", "prompts empty", "activations empty", "activations garbage"],
)
def test_activation_input_that_gives_nothing_skips_its_stages_and_every_other_stage_runs(corpus, damage):
    directory = corpus / "raw" / "activation_examples"
    prompts, activations = directory / "prompts.json", directory / "activations.jsonl"
    if damage == "prompts truncated":
        prompts.write_bytes(prompts.read_bytes()[:100])
    elif damage == "prompts missing":
        prompts.unlink()
    elif damage == "prompts empty":
        prompts.write_bytes(b"[]")
    elif damage == "activations empty":
        activations.write_bytes(b"")
    else:
        activations.write_bytes(b"not json\n{also not\n\x00\x01\n")
    before = (corpus / "master" / layout.RUN_REPORT).stat().st_mtime_ns

    result = cli("run", corpus / "sae-atlas.toml", "--force")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert (corpus / "master" / layout.RUN_REPORT).stat().st_mtime_ns > before  # the report is rewritten
    statuses = {entry["stage"]: entry["status"] for entry in report(corpus)["stages"]}
    assert statuses == {
        "activation_examples": "skipped",
        "decoder_similarity": "ran",
        "scores": "ran",
        "explanation_embeddings": "ran",
        "features": "ran",
        "activation_embeddings": "skipped",
        "activation_similarity": "skipped",
        "activation_patterns": "skipped",
        "claims": "ran",
        "diagnosis": "ran",
        "latent_map": "ran",
        "families": "ran",
        "family_pairs": "ran",
    }
    examples = stage(corpus, "activation_examples")
    assert "no usable activation records" in examples["reason"] and examples["problems"]["count"] >= 1
    # the previous run's activation outputs are not served as if they were current
    for name in (
        layout.ACTIVATION_EXAMPLES,
        layout.ACTIVATION_EMBEDDINGS,
        layout.ACTIVATION_SIMILARITY,
        layout.ACTIVATION_PATTERNS,
    ):
        assert not (corpus / "master" / name).exists(), name
    assert validate(corpus / "master").ok


def test_a_directory_where_the_activation_files_should_be(corpus):
    activations = corpus / "raw" / "activation_examples" / "activations.jsonl"
    activations.unlink()
    activations.mkdir()
    result = cli("run", corpus / "sae-atlas.toml")
    no_traceback(result)
    assert result.returncode == 0
    assert said(result.stdout, activations, "file cannot be read (is a directory, not a file)")


# 4: values that would make outputs wrong


def test_values_that_would_make_outputs_wrong_are_refused(corpus):
    first = runs(corpus)[0]
    simulation = sorted((first / "scores" / "simulation").glob("*.txt"))[0]
    groups = orjson.loads(simulation.read_bytes())
    groups[0]["ev_correlation_score"] = 1.7e308
    simulation.write_bytes(orjson.dumps(groups))
    with (corpus / "raw" / "activation_examples" / "activations.jsonl").open("ab") as handle:
        handle.write(b'{"index": "7", "dataSetPromptId": 3, "sparseValues": [[2, 1e308]]}\n')
    decoder = next((corpus / "raw" / "sae").rglob("params.npz"))
    with np.load(decoder) as archive:
        arrays = dict(archive)
    arrays["W_dec"][11] = np.nan
    np.savez(decoder, **arrays)
    (first / "explanations" / f"{HOOK}_latent99999.txt").write_bytes(orjson.dumps("beyond the SAE"))

    result = cli("run", corpus / "sae-atlas.toml")
    no_traceback(result)
    assert result.returncode == 0
    output = result.stdout
    assert "ev_correlation_score value(s) outside [-2.0, 2.0] (e.g. 1.7e+308); counted as failed" in output
    assert "activation value 1e+308 is not a finite float32 number" in output
    assert "decoder rows of 1 latent(s) hold NaN or infinite values (first: latent 11)" in output
    assert "latent 99999 is outside the SAE (512 latents); skipped" in output

    master = corpus / "master"
    scores = pl.read_parquet(master / layout.SCORES).filter(pl.col("method").cast(pl.String) == "simulation")
    assert scores["score"].abs().max() <= 1.0 and scores["variance"].drop_nulls().is_finite().all()
    examples = pl.read_parquet(master / layout.ACTIVATION_EXAMPLES)
    assert examples["max_activation"].is_finite().all()
    neighbours = (
        pl.read_parquet(master / layout.DECODER_SIMILARITY, columns=["decoder_similarity"])
        .explode("decoder_similarity")
        .unnest("decoder_similarity")
    )
    assert neighbours["cosine_similarity"].is_between(-1, 1).all()
    assert 99999 not in pl.read_parquet(master / layout.FEATURES)["feature_id"].to_list()
    assert validate(master).ok
    shown = cli("show", master, 7 if 7 in examples["feature_id"].to_list() else examples["feature_id"][0])
    no_traceback(shown)
    assert shown.returncode == 0


# 5: an input that became unusable does not leave stale results behind


def test_an_unusable_decoder_removes_its_stale_neighbours(corpus):
    master = corpus / "master"
    assert pl.read_parquet(master / layout.FEATURES)["decoder_similarity"].list.len().sum() > 0
    decoder = next((corpus / "raw" / "sae").rglob("params.npz"))
    np.savez(decoder, W_dec=np.zeros((100, 32), np.float32), threshold=np.zeros(512, np.float32))

    result = cli("run", corpus / "sae-atlas.toml")
    no_traceback(result)
    assert result.returncode == 0
    outcome = stage(corpus, "decoder_similarity")
    assert outcome["status"] == "skipped" and outcome["removed_previous_output"]
    assert "W_dec has shape [100, 32]" in outcome["reason"]
    assert not (master / layout.DECODER_SIMILARITY).exists()
    assert stage(corpus, "features")["status"] == "ran"
    assert pl.read_parquet(master / layout.FEATURES)["decoder_similarity"].list.len().sum() == 0
    assert validate(master).ok


# 6: file names


def test_file_names_are_parsed_strictly_and_quoted_in_messages(corpus):
    first = runs(corpus)[0]
    explanations = first / "explanations"
    good = sorted(explanations.glob("*.txt"))[0]
    text = good.read_bytes()
    (explanations / f"{HOOK}_latent0.txt\n").write_bytes(text)  # ends in a newline: not latent 0
    (explanations / f"{HOOK}_latent１２.txt").write_bytes(text)  # full-width digits: not latent 12
    (explanations / f"{HOOK}_lat\nent5.txt").write_bytes(text)

    result = cli("run", corpus / "sae-atlas.toml")
    no_traceback(result)
    assert result.returncode == 0
    messages = stage(corpus, "explanation_embeddings")
    listed = [problem["file"] for problem in messages["problems"]["listed"]]
    assert str(explanations / f"{HOOK}_latent0.txt\n") in listed
    assert str(explanations / f"{HOOK}_latent１２.txt") in listed
    # every problem the run printed is one line, the odd names quoted
    lines = [line for line in result.stdout.splitlines() if "not a per-latent file" in line]
    assert any(repr(f"{explanations / f'{HOOK}_latent0.txt'}\n")[:-1] in line for line in lines), lines
    assert any("'" in line and "\\n" in line and "lat" in line for line in lines), lines


# 7: temporary files of killed runs


def test_temporary_files_of_killed_runs_are_removed_and_those_of_live_runs_kept(corpus):
    master = corpus / "master"
    # Stage 4 must run and embed for a while: its output is gone and its cache is a fresh one.
    (master / layout.ACTIVATION_EMBEDDINGS).unlink()
    config = corpus / "sae-atlas.toml"
    config.write_text(config.read_text() + 'cache_dir = "fresh-cache"\n')
    command = [*ordinary_user(), sys.executable, "-m", "sae_atlas", "run", str(corpus / "sae-atlas.toml")]
    # its own process group: kill -9 reaches the run's worker processes too, which would otherwise
    # outlive the test (the run cannot stop them when it is killed)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pattern = f".activation_embeddings.parquet.tmp-{process.pid}"
    temporary = master / pattern
    deadline = time.monotonic() + 300
    while not temporary.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert temporary.exists(), "the run finished before its temporary file was seen"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert temporary.exists()  # kill -9 leaves it behind

    live = subprocess.Popen(["sleep", "60"])
    try:
        concurrent = master / "stages" / f".scores.parquet.tmp-{live.pid}"
        concurrent.write_bytes(b"a concurrent run is writing this")
        result = cli("run", corpus / "sae-atlas.toml")
        no_traceback(result)
        assert result.returncode == 0
        assert not temporary.exists()
        assert concurrent.exists()  # a live run's file is never touched
        assert "removed 1 temporary file(s) left by interrupted runs" in result.stdout
    finally:
        live.kill()
        live.wait()


# Round 3. Raw inputs: only regular files, a size cap per kind, links found in a run directory stay inside it


def test_fifos_devices_and_links_out_of_a_run_are_reported_and_never_read(corpus):
    first, second = runs(corpus)
    explanations = sorted((first / "explanations").glob("*.txt"))
    explanations[0].unlink()
    os.mkfifo(explanations[0])  # named like an explanation: opening it would wait for a writer for ever
    score = sorted((second / "scores" / "fuzz").glob("*.txt"))[0]
    score.unlink()
    os.mkfifo(score)
    (second / "run_config.json").unlink()
    (second / "run_config.json").symlink_to("/dev/zero")  # read whole, it would fill the memory
    leaked = sorted((second / "explanations").glob("*.txt"))[0]
    leaked.unlink()
    leaked.symlink_to("/etc/passwd")
    inside = sorted((first / "explanations").glob("*.txt"))[2]
    kept_text = inside.read_text()
    inside.unlink()
    (first / "notes.txt").write_text(kept_text)
    inside.symlink_to(Path("..") / "notes.txt")  # a link that stays inside the run: read
    large = sorted((first / "explanations").glob("*.txt"))[1]
    large.write_text('"' + "x" * (2 * 2**20) + '"')  # over the 1 MiB cap of an explanation file
    prompts = corpus / "raw" / "activation_examples" / "prompts.json"
    prompts.unlink()
    os.mkfifo(prompts)

    command = [sys.executable, "-m", "sae_atlas", "run", str(corpus / "sae-atlas.toml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert said(output, explanations[0], "explanation file cannot be read (a FIFO, not a regular file)")
    assert said(output, score, "score file cannot be read (a FIFO, not a regular file)")
    assert said(output, second / "run_config.json", "cannot be read (a character device, not a regular file)")
    assert said(output, leaked, "a link to /etc/passwd, outside")
    assert said(output, large, "over the 1 MiB limit")
    assert said(output, prompts, "cannot be read (a FIFO, not a regular file)")
    texts = pl.read_parquet(corpus / "master" / layout.FEATURES)["explanation_text"].to_list()
    assert not any("root:" in text for text in texts)
    latent = int(inside.stem.rsplit("latent", 1)[1])
    texts = pl.read_parquet(corpus / "master" / layout.FEATURES).filter(pl.col("feature_id") == latent)
    assert orjson.loads(kept_text) in texts["explanation_text"].to_list()


def test_a_decoder_that_is_not_a_regular_file_is_one_line(corpus):
    decoder = next((corpus / "raw").rglob("params.npz"))
    decoder.unlink()
    os.mkfifo(decoder)
    result = subprocess.run(
        [sys.executable, "-m", "sae_atlas", "run", str(corpus / "sae-atlas.toml"), "--only", "decoder_similarity"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    no_traceback(result)
    assert said(result.stdout, decoder, "cannot be read (a FIFO, not a regular file)")


# Round 3. What a run removes and what it keeps


def test_a_run_removes_only_the_temporaries_of_its_own_outputs(corpus):
    """A temporary-looking name sae-atlas does not write is somebody else's: it stays."""
    master = corpus / "master"
    (master / "notes").mkdir()
    draft = master / "notes" / ".draft.md.tmp-999999"
    draft.write_text("a person's draft")
    beside = master / ".my-analysis.parquet.tmp-999999"
    beside.write_text("not ours")
    raw = corpus / "raw" / ".prompts.json.tmp-999999"
    raw.write_text("raw data")
    ours = master / "stages" / ".scores.parquet.tmp-999999"
    ours.write_text("left by a killed run")
    config = corpus / "sae-atlas.toml"
    original = config.read_text()
    for output_dir in (".", "master"):  # "." puts raw/ inside the output directory
        config.write_text(original.replace('output_dir = "master"', f'output_dir = "{output_dir}"'))
        result = cli("run", config, "--force", "--only", "decoder_similarity")
        no_traceback(result)
        assert result.returncode == 0, result.stderr
    assert draft.exists() and beside.exists() and raw.exists()
    assert not ours.exists()


def test_two_sources_with_the_same_explainer_and_scorer_are_reported(corpus):
    first, _ = runs(corpus)
    shutil.copytree(first, corpus / "raw" / "again")
    import tomllib

    config = corpus / "sae-atlas.toml"
    text = config.read_text()
    source = next(item for item in tomllib.loads(text)["sources"] if item["name"] == first.name)
    again = f'[[sources]]\nname = "again"\npath = "raw/again"\nexplainer = "{source["explainer"]}"\n'
    again += f'scorer = "{source["scorer"]}"\n\n'
    config.write_text(text.replace("[[sources]]", again + "[[sources]]", 1))
    result = cli("run", config)
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert said(result.stdout, first, "has the same explainer")
    assert "features.parquet and compare use 'again'" in result.stdout
    assert stage(corpus, "features")["problems"]["count"] == 1


def test_names_from_the_study_are_data_in_every_report_and_table(corpus):
    """Markdown gets raw HTML and newlines escaped; rich tables show markup as text; a scorer
    named like a separator stays one scorer."""
    config = corpus / "sae-atlas.toml"
    hostile = r"<img src=x onerror=alert(1)>\n# owned [bold]b|fuzz"  # no "/": short names keep all of it
    text = config.read_text()
    config.write_text(
        text.replace('scorer = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"', f'scorer = "{hostile}"')
    )
    assert cli("run", config).returncode == 0
    result = cli("report", corpus / "master", "-o", corpus / "report.md", "--resamples", "100")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    markdown = (corpus / "report.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert not any(line.startswith("# owned") or line.startswith("#  owned") for line in markdown.splitlines())
    assert "\\# owned" in markdown
    compare = cli("compare", corpus / "master", "--resamples", "100")
    no_traceback(compare)
    assert compare.returncode == 0, compare.stderr
    assert "[bold]b|fuzz" in compare.stdout  # shown as written, not as a bold "b|fuzz"
    as_json = orjson.loads(cli("compare", corpus / "master", "--resamples", "100", "--json").stdout)
    assert {row["metric"] for row in as_json["summary"]} == set(as_json["settings"]["metrics"])
    assert {row["scorer"] for row in as_json["summary"]} == {hostile.replace("\\n", "\n")}
