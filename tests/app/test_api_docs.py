"""The API documents itself: every schema field and parameter has a description in OpenAPI, and
/docs and /redoc load only assets that the app itself serves (they work offline)."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bitplan.app.main import create_app
from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


def _undocumented(schema: dict[str, Any], where: str) -> Iterator[str]:
    """Paths of properties without a description, nested inline objects and items included."""
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            yield f"{where}.{name}"
        yield from _undocumented(prop, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _undocumented(schema[key], f"{where}[]")
    for key in ("anyOf", "allOf", "oneOf"):
        for option in schema.get(key, []):
            yield from _undocumented(option, where)


def test_every_schema_field_and_parameter_is_described(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"JobRead", "JobCreate", "FrontierRead", "ModelRead", "Problem"} <= set(schemas)
    missing = [name for name, schema in schemas.items() if not schema.get("description")]
    for name, schema in schemas.items():
        missing += _undocumented(schema, name)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            missing += [
                f"{method.upper()} {path} ?{parameter['name']}"
                for parameter in operation.get("parameters", [])
                if not parameter.get("description")
            ]
    assert missing == []
    job = schemas["JobRead"]["properties"]
    assert {"progress", "eta_s", "stage_progress", "stage_eta_s"} <= set(job)
    assert "whole job" in job["progress"]["description"]


def _secured(spec: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if operation.get("security")
    }


def test_bearer_auth_is_declared_only_when_keys_are_required(settings: Settings) -> None:
    open_spec = create_app(settings).openapi()  # the fixture's settings: keys off
    assert "securitySchemes" not in open_spec["components"]
    assert _secured(open_spec) == set()
    keyed_spec = create_app(settings.model_copy(update={"auth": "on"})).openapi()
    assert keyed_spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    secured = _secured(keyed_spec)
    assert {"POST /v1/jobs", "GET /v1/models", "DELETE /v1/datasets/{blob_id}"} <= secured
    assert not {"GET /v1/health", "GET /v1/health/ready"} & secured


class _Links(HTMLParser):
    """The URLs a page loads: src/href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}),
        ("/redoc", {"redoc.standalone.js"}),
    ],
)
def test_docs_pages_load_only_local_assets(client: TestClient, page: str, assets: set[str]) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text  # no CDN, no fonts
    parser = _Links()
    parser.feed(response.text)
    assert {url.rsplit("/", 1)[-1] for url in parser.urls} >= assets
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    assert "/openapi.json" in response.text
