"""The map of latents in a real browser, at 16,384 latents: the points are drawn, hovering shows the
explanations, a click opens the latent, a box selection opens the table with exactly its latents."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from playwright.sync_api import expect

from sae_atlas import Atlas
from sae_atlas.config import load_config
from sae_atlas.pipeline import Pipeline
from sae_atlas.serve.app import create_app
from sae_atlas.synth import SynthOptions, synthesize
from tests.serving import serving
from tests.test_browser import ARTIFACTS, CHROMIUM_FLAGS, VIEWPORT, chromium_path, screenshot

pytestmark = pytest.mark.browser

WIDTH = 16_384


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, embedder):
    corpus = synthesize(
        tmp_path_factory.mktemp("map-corpus"),
        SynthOptions(
            features=WIDTH,
            explained=300,
            explainers=2,
            scorers=1,
            prompts=600,
            ctx=64,
            d_model=128,
            seed=5,
            plant_families=True,
        ),
    )
    # the map needs the decoder only: without activations the run takes seconds
    config = load_config(corpus.config).model_copy(update={"activations": None})
    Pipeline(config, embedder=embedder).run()
    with serving(create_app(Atlas(config.output_dir, embedder=embedder), prepare=False)) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport=VIEWPORT)
        yield page
        browser.close()


def open_map(page, base_url: str, query: str = "") -> dict:
    page.goto(f"{base_url}/map{query}")
    page.wait_for_selector("canvas#map[data-ready='true']")
    return httpx.get(f"{base_url}/api/map{query}").json()


def point_on_screen(page, index: int) -> tuple[float, float]:
    box = page.locator("canvas#map").bounding_box()
    spot = page.evaluate(f"window.saeAtlasMap.screenOf({index})")
    return box["x"] + spot["x"], box["y"] + spot["y"]


def test_the_map_draws_every_latent_and_hover_and_click_work(page, base_url):
    data = open_map(page, base_url)
    assert data["total"] == WIDTH and len(data["x"]) == WIDTH
    assert page.locator("#map-status").inner_text() == f"{WIDTH:,} latents drawn"
    painted = page.evaluate(
        """() => { const c = document.getElementById('map');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0;
                   for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250) n++;
                   return n; }"""
    )
    assert painted > 2000  # thousands of coloured pixels, not a blank canvas
    # an explained latent: the tooltip shows its explanations
    explained = {row["feature_id"] for row in httpx.get(f"{base_url}/api/features?limit=1000").json()["rows"]}
    index = next(i for i, feature in enumerate(data["feature_id"]) if feature in explained)
    feature = data["feature_id"][index]
    x, y = point_on_screen(page, index)
    page.mouse.move(x, y)
    tip = page.locator("#map-tip")
    tip.wait_for(state="visible")
    expect(page.locator("#map-tip .tip-text")).not_to_have_text("…")
    text = tip.inner_text()
    hovered = int(text.split()[0].lstrip("#"))
    expected = httpx.get(f"{base_url}/api/map/explanations?feature_id={hovered}").json()
    assert expected["explanations"] and expected["explanations"][0]["text"][:30] in text
    screenshot(page, "map-hover")
    with page.expect_navigation():
        page.mouse.click(x, y)
    assert page.url.endswith(f"/features/{hovered}") and hovered in (feature, *data["feature_id"])
    assert page.locator("#family h2").inner_text() == "Family"
    page.locator("#family").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "feature-family.png"))


def test_a_box_selection_opens_the_table_with_exactly_its_latents(page, base_url):
    data = open_map(page, base_url, "?colour=fuzz")
    box = page.locator("canvas#map").bounding_box()
    # a box around the middle third of the canvas
    start = (box["x"] + box["width"] / 3, box["y"] + box["height"] / 3)
    stop = (box["x"] + 2 * box["width"] / 3, box["y"] + 2 * box["height"] / 3)
    page.keyboard.down("Shift")
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*stop, steps=5)
    with page.expect_navigation():
        page.mouse.up()
    page.keyboard.up("Shift")
    bounds = [float(value) for value in parse_qs(urlparse(page.url).query)["box"][0].split(",")]
    x0, y0, x1, y1 = bounds
    inside = {
        feature
        for feature, x, y in zip(data["feature_id"], data["x"], data["y"], strict=True)
        if x0 <= x <= x1 and y0 <= y <= y1
    }
    assert len(inside) > 100
    rows = httpx.get(f"{base_url}/api/features", params={"box": ",".join(map(str, bounds)), "limit": 1000}).json()
    explained = {row["feature_id"] for row in httpx.get(f"{base_url}/api/features?limit=1000").json()["rows"]}
    assert {row["feature_id"] for row in rows["rows"]} == inside & explained
    shown = {int(text) for text in page.locator("#features tbody a.row-link").all_inner_texts()}
    assert shown == inside & explained and shown
    screenshot(page, "map-box-table")
