"""The feature browser in a real browser: Debian's chromium driven by Playwright.

Screenshots are kept in ``artifacts/screenshots/`` (or ``$SAE_ATLAS_ARTIFACTS``) for a person to look at.
`.ci/run` and `make test` install chromium when it is missing; without it these tests fail with the
command to run, rather than being skipped.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from sae_atlas import Atlas
from sae_atlas.serve.app import create_app
from tests.serving import serving

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SAE_ATLAS_ARTIFACTS", ROOT / "artifacts")) / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str:
    for candidate in (os.environ.get("SAE_ATLAS_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "chromium not found: install Debian's chromium (apt-get install -y chromium) "
        "or set SAE_ATLAS_CHROMIUM to a Chromium binary",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def base_url(small_run, embedder):
    config, _ = small_run
    with serving(create_app(Atlas(config.output_dir, embedder=embedder))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fits_the_viewport(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def numbers(page, selector: str) -> list[float]:
    texts = page.locator(selector).all_inner_texts()
    return [float(text) for text in texts if text.strip() not in ("", "–")]


def test_index_lists_the_features_with_their_explanations(page, base_url, small_run):
    import polars as pl

    page.goto(base_url + "/")
    rows = page.locator("#features tbody tr")
    assert rows.count() == 100
    texts = pl.read_parquet(small_run[0].output_dir / "features.parquet")["explanation_text"].to_list()
    html = page.content()
    # server-rendered: the explanations are in the HTML as it arrives
    assert sum(text.replace('"', "&quot;") in html or text in html for text in texts[:20]) >= 15
    assert "240" in page.locator(".count").inner_text()
    assert fits_the_viewport(page)
    screenshot(page, "index")


def test_every_input_has_a_label(page, base_url):
    for path in ("/", "/plots"):
        page.goto(base_url + path)
        unlabelled = page.evaluate("""() => Array.from(document.querySelectorAll('input:not([type=hidden]), select'))
            .filter(element => !(element.labels && element.labels.length)).map(element => element.name)""")
        assert unlabelled == [], path


def test_filter_by_explainer_and_score_then_sort(page, base_url):
    page.goto(base_url + "/")
    page.locator("details.filters summary").click()
    page.select_option("#explainer", index=2)
    chosen = page.locator("#explainer option:checked").inner_text()
    page.fill("#fuzz_min", "0.7")
    with page.expect_navigation():
        page.click("text=Apply filters")
    assert "fuzz_min=0.7" in page.url
    explainers = page.locator("#features tbody tr td:nth-child(2)").all_inner_texts()
    assert explainers and set(explainers) == {chosen}
    # columns: feature, explainer, explanation, label, then the metrics (fuzz, detection, …)
    assert min(numbers(page, "#features tbody tr td:nth-child(5)")) >= 0.7
    with page.expect_navigation():
        page.click("#features thead a:has-text('detection')")
    detection = numbers(page, "#features tbody tr td:nth-child(6)")
    assert detection == sorted(detection, reverse=True) and "sort=detection" in page.url
    assert set(page.locator("#features tbody tr td:nth-child(2)").all_inner_texts()) == {chosen}  # filters kept
    screenshot(page, "index-filtered")


def test_semantic_search(page, base_url):
    page.goto(base_url + "/")
    page.fill("#q", "names of birds")
    with page.expect_navigation():
        page.press("#q", "Enter")
    hits = page.locator(".hits tbody tr")
    assert hits.count() == 25
    assert "bird" in hits.first.inner_text().lower()
    screenshot(page, "search")


def test_feature_page_shows_explanations_scores_neighbours_and_highlighted_tokens(page, base_url):
    page.goto(base_url + "/")
    first = page.locator("#features a.row-link").first
    feature_id = first.inner_text()
    with page.expect_navigation():
        first.click()
    assert page.url.endswith(f"/features/{feature_id}")
    assert page.locator("h1").inner_text() == f"Feature {feature_id}"
    assert page.locator("article.explanation").count() >= 1
    assert page.locator("article.explanation table.matrix tbody tr").count() >= 1
    assert page.locator("#neighbours a.row-link").count() == 10
    # tokens highlighted by activation value, the value on hover
    highlighted = page.locator(".example .tokens > .tok[title]")
    assert highlighted.count() > 0
    for index in range(min(highlighted.count(), 20)):
        token = highlighted.nth(index)
        assert float(token.get_attribute("title")) > 0
        assert "rgba(234, 88, 12" in token.get_attribute("style")
    assert page.locator(".example .tokens > .tok.peak").count() == page.locator("li.example").count()
    assert page.locator("h3", has_text=re.compile(r"^Quantile \d")).count() >= 1
    # the diagnosis: the latent's pattern with its rule, a row per explainer with a cause or none
    diagnosis = page.locator("section#diagnosis")
    assert re.match(r"^(lexical|mixed|contextual|diffuse)", diagnosis.locator("p.pattern strong").inner_text())
    rows = diagnosis.locator("table.diagnosis tbody tr:not(.claims)")
    assert rows.count() == page.locator("article.explanation").count()
    assert diagnosis.locator("span.claim").count() >= 1  # each explanation's claims, corroborated ones marked
    assert fits_the_viewport(page)
    screenshot(page, "feature")
    diagnosis.screenshot(path=str(ARTIFACTS / "feature-diagnosis.png"))
    with page.expect_navigation():
        page.locator("#neighbours a.row-link").first.click()
    assert re.search(r"/features/\d+$", page.url)


def test_table_keyboard_navigation(page, base_url):
    page.goto(base_url + "/")
    links = page.locator("#features a.row-link")
    links.first.focus()
    for _ in range(4):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowUp")
    target = links.nth(3).get_attribute("href")
    assert page.evaluate("document.activeElement.getAttribute('href')") == target
    assert page.evaluate("document.activeElement.closest('tr').rowIndex") == 4  # header row is 0
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith(target)


def test_plots_histogram_and_clickable_scatter(page, base_url):
    page.goto(base_url + "/plots")
    assert page.locator("#histogram rect.bar").count() == 20
    page.select_option("#metric", "simulation")
    page.fill("#bins", "12")
    page.select_option("#x", "activation_similarity")
    with page.expect_navigation():
        page.click("text=Draw")
    assert page.locator("#histogram rect.bar").count() == 12
    heights = [float(bar.get_attribute("height")) for bar in page.locator("#histogram rect.bar").all()]
    assert max(heights) > 0
    points = page.locator("#scatter circle.point")
    assert points.count() > 100
    assert fits_the_viewport(page)
    screenshot(page, "plots")
    with page.expect_navigation():
        points.first.click()
    assert re.search(r"/features/\d+$", page.url)


def test_unknown_feature_page(page, base_url):
    response = page.goto(base_url + "/features/999999")
    assert response.status == 404 and "not found" in page.locator("h1").inner_text()


def test_compare_page_draws_intervals_differences_and_agreement(page, base_url, small_run):
    import polars as pl

    page.goto(base_url + "/compare?resamples=500")
    scores = pl.read_parquet(small_run[0].output_dir / "stages/scores.parquet")
    explainers, scorers = scores["llm_explainer"].n_unique(), scores["llm_scorer"].n_unique()
    fuzz = page.locator("section.metric", has=page.locator("h2#metric-fuzz"))
    # one interval per explainer × scorer, one paired difference per pair of explainers × scorer
    assert fuzz.locator("svg.forest").first.locator("g.forest-row").count() == explainers * scorers
    pairs = explainers * (explainers - 1) // 2
    assert fuzz.locator("table.paired tbody tr").count() == pairs * scorers
    # scorer agreement within each explainer: one row per explainer × two scorers, α per explainer
    assert fuzz.locator("table", has_text="Spearman").locator("tbody tr").count() == explainers * (
        scorers * (scorers - 1) // 2
    )
    assert fuzz.locator("table", has_text="Krippendorff").locator("tbody tr").count() == explainers
    assert fuzz.locator("figure.profile").count() >= 1  # score by activation quantile
    assert page.locator("#comparability-title").is_visible()
    # the answer is in the first screen: its sentences and its ranking above the fold
    answer = page.locator("section.headline ul.sentences li").first
    assert answer.is_visible() and answer.bounding_box()["y"] < page.viewport_size["height"]
    assert page.locator("section.headline table.headline-pairs tbody tr").count() >= pairs
    unlabelled = page.evaluate("""() => Array.from(document.querySelectorAll('input:not([type=hidden])'))
        .filter(element => !(element.labels && element.labels.length)).map(element => element.name)""")
    assert unlabelled == []
    # why explanations fail, by explainer: a row per explainer in both tables, the unit said
    reasons = page.locator("section.diagnosis")
    assert reasons.locator("table").first.locator("tbody tr").count() == explainers
    assert "Unit of resampling: latents" in reasons.inner_text()
    assert fits_the_viewport(page)
    screenshot(page, "compare")
    reasons.screenshot(path=str(ARTIFACTS / "compare-diagnosis.png"))

    # choose one metric and fewer resamples: the page and its URL follow
    for box in page.locator("input[name=metric]").all():
        box.uncheck()
    page.check("input[name=metric][value=detection]")
    with page.expect_navigation():
        page.click(".compare-form button[type=submit]")
    assert "metric=detection" in page.url and page.locator("section.metric").count() == 1
    # a disagreement links to its feature
    link = page.locator("table.disagreements a").first
    target = link.get_attribute("href")
    with page.expect_navigation():
        link.click()
    assert page.url.endswith(target) and re.search(r"/features/\d+$", page.url)


def test_evidence_page_shows_each_runs_verdict_as_its_json_twin(page, base_url, small_run):
    """What the scorers saw: the rows of the page are those of its JSON twin, filter by filter."""
    import polars as pl

    records = pl.read_parquet(small_run[0].output_dir / "stages/score_records.parquet")
    feature = int(records["feature_id"][0])
    page.goto(f"{base_url}/features/{feature}")
    # the feature page shows the examples that separate the explainers, and links to all of them
    assert page.locator("section", has=page.locator("#evidence-title")).locator("table.evidence-table").count() >= 1
    with page.expect_navigation():
        page.click("p.evidence-link a")
    assert page.url.endswith(f"/features/{feature}/evidence")
    runs = records["data_source"].n_unique()
    fuzz = page.locator("section.evidence", has=page.locator("h2#evidence-fuzz"))
    assert fuzz.locator("tbody tr").first.locator("td.verdict").count() == runs
    page.select_option("#show", "disagree")
    page.select_option("#method", "fuzz")
    with page.expect_navigation():
        page.click(".evidence-form button[type=submit]")
    assert "show=disagree" in page.url and page.locator("section.evidence").count() == 1
    twin = page.request.get(f"{base_url}/api/features/{feature}/evidence?show=disagree&method=fuzz").json()
    [section] = twin["methods"]
    assert fuzz.locator("tbody tr").count() == len(section["examples"]) == section["counts"]["disagree"]
    # each column is the run the JSON says (model names sort differently with and without case)
    columns = fuzz.locator("thead th.verdict").evaluate_all("cells => cells.map(cell => cell.title.split(':')[0])")
    assert columns == [run["data_source"] for run in twin["runs"]]
    marks = fuzz.locator("tbody tr").first.locator("td.verdict").all_inner_texts()
    expected = {"correct": "✓", "wrong": "✗", "failed": "!", None: "–"}
    assert marks == [expected[verdict] for verdict in section["examples"][0]["verdicts"]]
    assert fits_the_viewport(page)
    screenshot(page, "evidence")
