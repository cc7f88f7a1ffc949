"""People's labels: an append-only store in the output directory that `run` never touches, writes
checked as hostile (origin, host, token, size, fields), nothing acknowledged ever lost."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sae_atlas import layout
from sae_atlas.cli import app as cli
from sae_atlas.label_store import LabelError, LabelIn, LabelStore, text_hash
from sae_atlas.query.atlas import Atlas
from sae_atlas.query.labelling import Labelling
from sae_atlas.serve.app import create_app
from sae_atlas.serve.label_routes import MAX_BODY, WriteSettings
from tests.serving import free_port, serving

BASE = "http://127.0.0.1:8000"


@pytest.fixture
def output(small_run, tmp_path) -> Path:
    """A copy of the small run's outputs: labels written here touch no other test."""
    copy = tmp_path / "out"
    shutil.copytree(small_run[0].output_dir, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


@pytest.fixture
def atlas(output, embedder) -> Atlas:
    return Atlas(output, embedder=embedder)


def explained(atlas: Atlas) -> tuple[int, str, str]:
    feature, explainer, text = (
        atlas.features(limit=None)
        .filter(pl.col("explanation_ok"))
        .select("feature_id", "explainer", "explanation_text")
        .row(0)
    )
    return feature, explainer, text


# -- the store ------------------------------------------------------------------------------------


def test_labels_are_appended_taken_back_and_stale_when_the_text_changed(tmp_path):
    store = LabelStore(tmp_path)
    texts = {(3, "e"): "the word Paris"}
    first, second = store.add(
        [
            LabelIn(feature_id=3, explainer="e", verdict="bad"),
            LabelIn(feature_id=3, explainer="e", verdict="good", causes=["too broad"]),
        ],
        sae_id="s",
        texts=texts,
        default_author="ann",
    )
    store.add(
        [LabelIn(feature_id=4, verdict="unsure", note="<b>hm</b>")], sae_id="s", texts=texts, default_author="bob"
    )
    current = store.current(texts)
    assert current.select("feature_id", "explainer", "verdict", "stale").rows() == [
        (3, "e", "good", False),
        (4, None, "unsure", False),
    ]
    assert (
        current.filter(pl.col("feature_id") == 4)["note"].item() == "<b>hm</b>"
    )  # stored as given, escaped when shown
    # the explanation was rewritten since: the label is stale, not carried over
    assert store.current({(3, "e"): "European capitals"}).filter(pl.col("feature_id") == 3)["stale"].item()
    # taking back ann's newest label of (3, e) makes the one before current again
    assert store.retract_last(sae_id="s", feature_id=3, explainer="e", author="ann") == second
    assert store.current(texts).filter(pl.col("feature_id") == 3)["verdict"].item() == "bad"
    assert store.retract_last(sae_id="s", feature_id=3, explainer="e", author="bob") is None
    history = store.history()
    assert history["action"].to_list() == ["label", "label", "label", "retract"]
    assert history["label_id"][0] == first and history["text_hash"][0] == text_hash("the word Paris")
    # history is append-only, whatever writes to the file
    with sqlite3.connect(store.path) as connection, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        connection.execute("UPDATE labels SET verdict = 'good'")
    with sqlite3.connect(store.path) as connection, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        connection.execute("DELETE FROM labels")
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_read_only_store_creates_nothing_and_refuses_writes(tmp_path):
    store = LabelStore(tmp_path, read_only=True)
    assert store.history().is_empty() and not store.path.exists()
    with pytest.raises(LabelError, match="read-only"):
        store.add([LabelIn(feature_id=1, verdict="good")], sae_id="s", texts={}, default_author="a")


def test_causes_come_from_the_vocabulary_and_the_config(tmp_path):
    store = LabelStore(tmp_path, causes=["tokenizer artefact"])
    store.add(
        [LabelIn(feature_id=1, verdict="bad", causes=["tokenizer artefact"])], sae_id="s", texts={}, default_author="a"
    )
    with pytest.raises(LabelError, match="unknown cause 'made up'"):
        store.add([LabelIn(feature_id=1, verdict="bad", causes=["made up"])], sae_id="s", texts={}, default_author="a")


# -- writes over HTTP -----------------------------------------------------------------------------


def client_of(atlas: Atlas, **settings) -> tuple[TestClient, WriteSettings]:
    writes = WriteSettings(**{"host": "127.0.0.1", "port": 8000, **settings})
    return TestClient(create_app(atlas, prepare=False, writes=writes), base_url=BASE), writes


def test_a_page_writes_with_its_token_and_nothing_else_writes(atlas):
    client, writes = client_of(atlas)
    feature, explainer, _ = explained(atlas)
    page = client.get(f"/features/{feature}").text
    assert f'<meta name="sae-atlas-token" content="{writes.page_token}">' in page
    label = {"feature_id": feature, "explainer": explainer, "verdict": "good", "note": "<script>x</script>"}
    own = {"Origin": BASE, "X-SAE-Atlas-Token": writes.page_token}
    response = client.post("/api/labels", json=label, headers=own)
    assert response.status_code == 201, response.text
    (label_id,) = response.json()["labels"]
    refusals = {
        "another origin": (
            {"Origin": "http://evil.example", "X-SAE-Atlas-Token": writes.page_token},
            403,
            "another origin",
        ),
        "no token": ({"Origin": BASE}, 403, "needs the page's token"),
        "a wrong token": ({"Origin": BASE, "X-SAE-Atlas-Token": "guess"}, 403, "needs the page's token"),
        "another host": (
            {"Host": "evil.example:8000", "X-SAE-Atlas-Token": writes.page_token},
            403,
            "is not this server",
        ),
    }
    for case, (headers, status, message) in refusals.items():
        refused = client.post("/api/labels", json=label, headers=headers)
        assert (refused.status_code, message in refused.json()["detail"]) == (status, True), case
    stored = client.get("/api/labels", params={"feature_id": feature}).json()["labels"]
    assert [row["label_id"] for row in stored] == [label_id] and stored[0]["note"] == "<script>x</script>"


def test_the_feature_table_filters_by_label_and_shows_each_rows_label(atlas):
    client, writes = client_of(atlas)
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok")).select("feature_id", "explainer").rows()
    (f1, e1), (f2, e2), (f3, _) = rows[:3]
    own = {"Origin": BASE, "X-SAE-Atlas-Token": writes.page_token}
    labels = [
        {"feature_id": f1, "explainer": e1, "verdict": "good"},
        {"feature_id": f2, "explainer": e2, "verdict": "bad", "causes": ["too broad"]},
        {"feature_id": f3, "verdict": "unsure"},  # the latent itself: no explanation row is labelled by it
    ]
    assert client.post("/api/labels", json=labels, headers=own).status_code == 201
    total = client.get("/api/features").json()["total"]

    def keys(**params) -> tuple[set, int]:
        page = client.get("/api/features", params={"limit": 1000, **params}).json()
        return {(row["feature_id"], row["explainer"]) for row in page["rows"]}, page["total"]

    assert keys(labelled="yes") == ({(f1, e1), (f2, e2)}, 2)
    assert keys(labelled="bad") == ({(f2, e2)}, 1)
    unlabelled, count = keys(labelled="no")
    assert count == total - 2 and not unlabelled & {(f1, e1), (f2, e2)}
    # the filter applies before paging: the second labelled row is the first of page two
    assert client.get("/api/features", params={"labelled": "yes", "limit": 1, "offset": 1}).json()["rows"][0][
        "feature_id"
    ] == max(f1, f2)
    page = client.get("/api/features", params={"labelled": "bad"}).json()["rows"]
    assert (page[0]["verdict"], page[0]["causes"], page[0]["label_stale"]) == ("bad", ["too broad"], False)
    assert client.get("/api/features", params={"labelled": "maybe"}).status_code == 422
    csv = pl.read_csv(client.get("/api/features", params={"labelled": "yes", "format": "csv"}).content)
    assert sorted(csv["verdict"].to_list()) == ["bad", "good"] and '["too broad"]' in csv["causes"].to_list()
    html = client.get("/", params={"labelled": "yes"}).text
    assert 'option value="yes" selected' in html and ">bad</td>" in html and ">good</td>" in html
    exported = atlas.output_dir.parent / "bad.parquet"
    result = CliRunner().invoke(
        cli, ["export", "table", str(atlas.output_dir), "--labelled", "bad", "-o", str(exported)]
    )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(exported).select("feature_id", "verdict").rows() == [(f2, "bad")]


def test_the_queue_is_ordered_once_and_labelled_pairs_leave_it_without_reordering(atlas, monkeypatch):
    from sae_atlas.query import triage

    labelling = Labelling(atlas)
    first, _, _ = triage.ordered(atlas, labelling.current(), order="scorer_disagreement", version=labelling.version())
    computed = []
    original = triage._every_explanation
    monkeypatch.setattr(triage, "_every_explanation", lambda *a, **k: computed.append(1) or original(*a, **k))
    feature, explainer, _ = first.row(0)
    labelling.add([LabelIn(feature_id=feature, explainer=explainer, verdict="bad")], author="ann")
    after, _, _ = triage.ordered(atlas, labelling.current(), order="scorer_disagreement", version=labelling.version())
    assert computed == [] and after.equals(first.slice(1))  # the same order, less the labelled pair
    fresh, _, _ = triage.ordered(atlas, labelling.current(), order="scorer_disagreement")
    assert computed == [1] and fresh.equals(after)  # without a version: computed again, the same queue


def test_malformed_and_oversized_writes_get_one_line(atlas):
    client, writes = client_of(atlas)
    own = {"Origin": BASE, "X-SAE-Atlas-Token": writes.page_token}
    feature, explainer, _ = explained(atlas)
    cases = [
        ({"feature_id": feature, "verdict": "great"}, 422, "verdict"),
        ({"feature_id": -1, "verdict": "good"}, 422, "feature_id"),
        ({"feature_id": feature, "verdict": "good", "note": "x" * 2001}, 422, "note"),
        ({"feature_id": feature, "verdict": "good", "extra": 1}, 422, "extra"),
        ({"feature_id": feature, "explainer": "nobody", "verdict": "good"}, 422, "has no explanation by 'nobody'"),
        ({"feature_id": 2**31, "verdict": "good"}, 422, "is not a latent of"),
        (
            {"feature_id": feature, "explainer": explainer, "verdict": "bad", "causes": ["made up"]},
            422,
            "unknown cause",
        ),
        ([], 422, "send 1 to 500 labels"),
    ]
    for body, status, message in cases:
        response = client.post("/api/labels", json=body, headers=own)
        assert response.status_code == status and message in response.json()["detail"], (body, response.text)
        assert "\n" not in response.json()["detail"]
    huge = client.post(
        "/api/labels", content=b"[" + b" " * MAX_BODY + b"]", headers={**own, "Content-Type": "application/json"}
    )
    assert huge.status_code == 413
    assert client.get("/api/labels").json()["labels"] == []  # nothing half-written


def test_read_only_and_remote_servers_without_a_token_refuse_writes(atlas):
    feature, _, _ = explained(atlas)
    label = {"feature_id": feature, "verdict": "good"}
    client, writes = client_of(atlas, read_only=True)
    response = client.post("/api/labels", json=label, headers={"Origin": BASE, "X-SAE-Atlas-Token": writes.page_token})
    assert response.status_code == 403 and "read-only" in response.json()["detail"]
    client, writes = client_of(atlas, host="0.0.0.0")
    response = client.post("/api/labels", json=label, headers={"X-SAE-Atlas-Token": writes.page_token})
    assert response.status_code == 403 and "without a write token" in response.json()["detail"]
    # with one, a script writes with it (and only with it)
    client, writes = client_of(atlas, host="0.0.0.0", write_token="s3cret")
    assert client.post("/api/labels", json=label, headers={"Authorization": "Bearer wrong"}).status_code == 403
    response = client.post("/api/labels", json=label, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 201, response.text


def test_ones_own_last_label_can_be_taken_back(atlas):
    client, writes = client_of(atlas)
    own = {"Origin": BASE, "X-SAE-Atlas-Token": writes.page_token}
    feature, explainer, _ = explained(atlas)
    for verdict in ("bad", "good"):
        client.post(
            "/api/labels",
            json={"feature_id": feature, "explainer": explainer, "verdict": verdict, "author": "ann"},
            headers=own,
        )
    params = {"feature_id": feature, "explainer": explainer}
    assert client.delete("/api/labels/last", params={**params, "author": "bob"}, headers=own).status_code == 404
    assert client.delete("/api/labels/last", params={**params, "author": "ann"}, headers=own).status_code == 200
    assert [row["verdict"] for row in client.get("/api/labels", params=params).json()["labels"]] == ["bad"]
    csv = client.get("/api/labels", params={"history": True, "format": "csv"})
    assert csv.status_code == 200 and csv.text.count("\n") == 4  # header and three rows


# -- the command line, and what `run` does ----------------------------------------------------------


def test_labels_from_the_command_line_export_and_import_by_id(atlas, output, tmp_path):
    feature, explainer, _ = explained(atlas)
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "label",
            str(output),
            str(feature),
            "--explainer",
            explainer,
            "--verdict",
            "partial",
            "--cause",
            "too broad",
            "--author",
            "ann",
        ],
    )
    assert result.exit_code == 0, result.output
    runner.invoke(cli, ["label", str(output), str(feature), "--verdict", "bad", "--note", "dead?", "--author", "bob"])
    bad = runner.invoke(cli, ["label", str(output), str(feature), "--verdict", "excellent"])
    assert bad.exit_code == 1 and "verdict" in bad.output
    fresh = tmp_path / "fresh"
    shutil.copytree(output, fresh, ignore=shutil.ignore_patterns(layout.LABELS + "*"))
    for suffix in ("csv", "jsonl", "parquet"):
        exported = tmp_path / f"labels.{suffix}"
        assert runner.invoke(cli, ["labels", str(output), "-o", str(exported)]).exit_code == 0
        for _ in range(2):  # importing twice changes nothing
            result = runner.invoke(cli, ["labels", "import", str(fresh), str(exported)])
            assert result.exit_code == 0, result.output
        mine = Labelling(Atlas(output)).current().drop("row")
        theirs = Labelling(Atlas(fresh)).current().drop("row")
        assert theirs.equals(mine) and mine.height == 2


@pytest.mark.slow
def test_run_force_keeps_every_label(tmp_path, embedder):
    from sae_atlas.config import load_config
    from sae_atlas.pipeline import Pipeline
    from sae_atlas.synth import SynthOptions, synthesize

    corpus = synthesize(
        tmp_path / "corpus", SynthOptions(features=256, explained=20, prompts=200, ctx=32, d_model=32, seed=5)
    )
    config = load_config(corpus.config)
    Pipeline(config, embedder=embedder).run()
    labelling = Labelling(Atlas(config.output_dir))
    feature = int(labelling.latents[0])
    labelling.add([LabelIn(feature_id=feature, verdict="good", note="keep me")], author="ann")
    before = labelling.store.history()
    Pipeline(config, embedder=embedder, force=True).run()
    assert LabelStore(config.output_dir).history().equals(before)


# -- many writers, and a server killed while they write ----------------------------------------------


def start_server(output: Path, port: int, log: Path) -> subprocess.Popen:
    handle = log.open("a")
    server = subprocess.Popen(
        [sys.executable, "-m", "sae_atlas", "serve", str(output), "--port", str(port), "--write-token", "tok"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def post_labels(port: int, writer: int, count: int, feature: int, acknowledged) -> None:
    """One writer: ``count`` labels, one request each; the ids of those acknowledged (2xx)."""
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer tok"}, timeout=30
    ) as client:
        for index in range(count):
            body = {"feature_id": feature, "verdict": "good", "note": f"{writer}-{index}", "author": f"w{writer}"}
            try:
                response = client.post("/api/labels", json=body)
            except httpx.HTTPError:
                return  # the server is gone: what was acknowledged before is what counts
            if response.status_code == 201:
                acknowledged.extend(response.json()["labels"])


def run_writers(port: int, feature: int, writers: int = 8, count: int = 100) -> tuple:
    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    acknowledged = manager.list()
    processes = [
        context.Process(target=post_labels, args=(port, writer, count, feature, acknowledged))
        for writer in range(writers)
    ]
    for process in processes:
        process.start()
    return processes, acknowledged, manager


@pytest.mark.slow
def test_eight_writers_lose_nothing_and_a_killed_server_keeps_every_acknowledged_label(atlas, output, tmp_path):
    feature, _, _ = explained(atlas)
    port, log = free_port(), tmp_path / "serve.log"
    server = start_server(output, port, log)
    try:
        processes, acknowledged, manager = run_writers(port, feature)
        for process in processes:
            process.join(timeout=300)
        ids = list(acknowledged)
        assert len(ids) == 800
        stored = LabelStore(output, read_only=True).history()
        assert set(ids) <= set(stored["label_id"].to_list()) and stored.height == 800

        # again, and kill -9 the server while the writers write
        processes, acknowledged, manager2 = run_writers(port, feature)
        deadline = time.monotonic() + 120
        while len(acknowledged) < 100 and time.monotonic() < deadline:  # the writers are writing
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        for process in processes:
            process.join(timeout=120)
        ids = list(acknowledged)
        assert 0 < len(ids) < 800, "the kill should land while the writers write"
        server = start_server(output, port, log)
        stored = set(LabelStore(output, read_only=True).history()["label_id"].to_list())
        assert set(ids) <= stored
        with sqlite3.connect(output / layout.LABELS) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        manager.shutdown()
        manager2.shutdown()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


# -- the triage queue -------------------------------------------------------------------------------


def test_the_uncertainty_order_waits_for_labels_of_each_verdict_then_is_reproducible(atlas):
    from sae_atlas.query.triage import ordered

    labelling = Labelling(atlas)
    queue, used, note = ordered(atlas, labelling.current(), order="uncertainty")
    assert used == "scorer_disagreement" and "needs 3 good and 3 bad labels" in note
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok")).sort("fuzz", nulls_last=True)
    good = rows.tail(3).select("feature_id", "explainer").rows()
    bad = rows.head(3).select("feature_id", "explainer").rows()
    labelling.add(
        [LabelIn(feature_id=f, explainer=e, verdict="good") for f, e in good]
        + [LabelIn(feature_id=f, explainer=e, verdict="bad") for f, e in bad],
        author="ann",
    )
    current = labelling.current()
    queue, used, note = ordered(atlas, current, order="uncertainty")
    again, _, _ = ordered(atlas, current, order="uncertainty")
    assert used == "uncertainty" and "logistic regression on 6 labels" in note and queue.equals(again)
    assert queue.height == rows.height - 6  # the labelled ones left the queue
    assert (queue["priority"].drop_nulls().diff().drop_nulls() <= 1e-12).all()  # least sure first
    random, used, note = ordered(atlas, current, order="random")
    assert used == "random" and "without bias" in note and sorted(random.rows()) != random.rows()


@pytest.mark.browser
def test_five_features_labelled_from_the_keyboard_stay_labelled(atlas, output):
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM_FLAGS, VIEWPORT, chromium_path, screenshot

    port = free_port()
    app = create_app(atlas, prepare=False, writes=WriteSettings(host="127.0.0.1", port=port))
    with serving(app, port) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(base + "/triage?order=random")
        screenshot(page, "triage")
        judged = []
        for key in ("1", "3", "2", "1", "4"):
            section = page.locator("#triage")
            judged.append((int(section.get_attribute("data-feature")), section.get_attribute("data-explainer")))
            if key == "3":  # a cause and a note, from the keyboard too
                page.keyboard.press("c")
                page.keyboard.press("Space")
                page.keyboard.press("n")
                page.keyboard.type("fires on <b>numbers</b> too")
                page.keyboard.press("Escape")
            with page.expect_navigation():
                page.keyboard.press(key)
        page.reload()
        screenshot(page, "triage-after-five")
        stored = {
            (row["feature_id"], row["explainer"]): row for row in httpx.get(base + "/api/labels").json()["labels"]
        }
        assert set(judged) <= set(stored) and len(stored) == 5
        verdicts = [stored[key]["verdict"] for key in judged]
        assert verdicts == ["good", "bad", "partial", "good", "unsure"]
        noted = stored[judged[1]]
        assert noted["causes"] == ["misses the token pattern"] and noted["note"] == "fires on <b>numbers</b> too"
        assert {row["origin"] for row in stored.values()} == {"triage:random"}
        # the page shows the next unlabelled explanation, and the total went down by five
        assert (
            int(page.locator("#triage").get_attribute("data-feature")),
            page.locator("#triage").get_attribute("data-explainer"),
        ) not in stored
        # the labels page: progress per explainer, and the scorers against these five verdicts
        page.goto(f"{base}/labels?resamples=200")
        assert page.locator("h1").inner_text() == "Labels"
        labelled = sum(
            int(cell.split()[0])
            for cell in page.locator("table.labels").first.locator("tbody tr td:nth-child(3)").all_inner_texts()
        )
        assert labelled == 5
        assert "Every label used was taken in the random order." in page.content()
        screenshot(page, "labels")
        # the index, labelled rows only: the five, each with its verdict
        page.goto(f"{base}/?labelled=yes")
        cells = page.locator("#features tbody td.verdict").all_inner_texts()
        assert sorted(cells) == sorted(verdicts)
        screenshot(page, "index-labelled")
        browser.close()


@pytest.mark.slow
def test_compare_and_report_carry_the_scorers_against_people(atlas, output, tmp_path):
    client, _ = client_of(atlas)
    assert client.get("/api/compare", params={"resamples": 200}).json()["people"] is None
    rows = atlas.features(limit=None).filter(pl.col("explanation_ok")).head(12).select("feature_id", "explainer").rows()
    Labelling(atlas).add(
        [
            LabelIn(feature_id=f, explainer=e, verdict=("good", "bad", "partial")[index % 3], origin="cli")
            for index, (f, e) in enumerate(rows)
        ],
        author="ann",
    )
    client, _ = client_of(atlas)  # a new server: the labels are read per request anyway
    people = client.get("/api/compare", params={"resamples": 200}).json()["people"]
    assert people["n"] == 12 and people["unbiased"] is False and people["origins"] == {"cli": 12}
    assert {row["scorer"] for row in people["scorers"]} == set(atlas.scorers)
    assert "The scorers against people" in client.get("/compare", params={"resamples": 200}).text
    report = tmp_path / "report.md"
    result = CliRunner().invoke(cli, ["report", str(output), "-o", str(report), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "## The scorers against people" in text and "12 labelled explanations; not every label came" in text
