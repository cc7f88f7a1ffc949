"""The HTTP API: TestClient checks and a schemathesis run against its OpenAPI schema."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from sae_atlas import Atlas
from sae_atlas.server import create_app


@pytest.fixture(scope="module")
def app(small_run, embedder):
    config, _ = small_run
    return create_app(Atlas(config.output_dir, embedder=embedder))


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def test_health_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/health",
        "/api/stats",
        "/api/features",
        "/api/features/{feature_id}",
        "/api/search",
        "/api/histogram",
        "/api/plots",  # the JSON twin of the /plots page
    }
    assert all(set(operations) == {"get"} for operations in paths.values())  # read-only


def test_features_endpoint(client):
    page = client.get(
        "/api/features", params={"sort": "fuzz", "order": "desc", "limit": 7, "offset": 1, "detection_min": 0.5}
    ).json()
    assert page["limit"] == 7 and page["offset"] == 1 and len(page["rows"]) == 7
    fuzz = [row["fuzz"] for row in page["rows"]]
    assert fuzz == sorted(fuzz, reverse=True)
    assert all(row["detection"] >= 0.5 for row in page["rows"]) and page["total"] >= 8


def test_feature_endpoint(client):
    first = client.get("/api/features", params={"limit": 1}).json()["rows"][0]["feature_id"]
    record = client.get(f"/api/features/{first}").json()
    assert record["feature_id"] == first and record["explanations"] and record["activation_examples"]
    missing = client.get("/api/features/999999")
    assert missing.status_code == 404 and missing.json()["detail"] == "feature 999999 not found"


def test_search_histogram_stats(client):
    hits = client.get("/api/search", params={"q": "names of birds", "k": 4}).json()["hits"]
    assert len(hits) == 4 and hits[0]["similarity"] >= hits[-1]["similarity"]
    histogram = client.get("/api/histogram", params={"metric": "detection", "bins": 5}).json()
    assert len(histogram["counts"]) == 5
    assert client.get("/api/stats").json()["rows"] == 240


@pytest.mark.parametrize(
    ("url", "params", "fragment"),
    [
        ("/api/features", {"limit": 5000}, "limit"),
        ("/api/features", {"sort": "nonsense"}, "sort"),
        ("/api/features", {"explainer": "nobody"}, "explainer: Input should be"),
        ("/api/features", {"fuzz_min": "high"}, "fuzz_min"),
        ("/api/features", {"surprise": 1}, "surprise"),
        ("/api/features/-4", {}, "feature_id"),
        ("/api/search", {"q": ""}, "q"),
        ("/api/search", {"q": "x", "k": 0}, "k"),
        ("/api/histogram", {"metric": "nonsense"}, "metric"),
        ("/api/histogram", {"metric": "fuzz", "scorer": "nobody"}, "scorer: Input should be"),
    ],
)
def test_invalid_parameters_are_422_with_a_message(client, url, params, fragment):
    response = client.get(url, params=params)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and fragment in detail and "\n" not in detail


def operations(app):
    """Every operation of the app's OpenAPI schema, as schemathesis sees it."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_api_conforms_to_its_schema_and_never_fails(app):
    # schemathesis generates valid and invalid requests from the schema; every response must match
    # the schema (status, content type, body) and none may be a 5xx.
    checked = []
    for operation in operations(app):
        # Invalid data needs a parameter to break: /health and /api/stats have none.
        has_parameters = any(True for _ in operation.iter_parameters())
        for mode in (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_parameters else (GenerationMode.POSITIVE,)
        ):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def conforms(case):
                case.call_and_validate()

            conforms()
            checked.append((operation.label, mode.value))
    assert len(checked) == 12, checked  # /health and /api/stats take no parameters
