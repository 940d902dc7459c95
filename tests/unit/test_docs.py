"""The API pages (/docs, /redoc), their assets and the schema they show: app/api/docs.py."""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser

import pytest

from app.api.docs import API_KEY_SCHEME, ASSETS, REDOC_CSP, STATIC_URL, SWAGGER_UI_CSP
from app.server.middleware import STRICT_CSP_HEADER
from scripts.harness.samples import IRIS_ROW

PAGES = {"/docs": SWAGGER_UI_CSP, "/redoc": REDOC_CSP}
STRICT_CSP = STRICT_CSP_HEADER[1].decode()
KEY = "docs-page-key"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()


class _PageParser(HTMLParser):
    """What a page loads (src/href of script, link, img) and any script or style written into it."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in ("script", "link", "img"):
            self.references += [v for k, v in attributes.items() if k in ("src", "href") and v]
        if tag == "script" and "src" not in attributes:
            self.inline.append("script without src")
        if tag == "style" or "style" in attributes or any(k.startswith("on") for k in attributes):
            self.inline.append(f"<{tag}> with inline style or handler")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data.strip()[:60])


def parsed(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    return parser


@pytest.mark.parametrize("page", PAGES)
def test_page_references_only_assets_of_its_own_origin(client, page):
    references = parsed(client.get(page).text).references
    assert references
    assert all(r.startswith(STATIC_URL + "/") for r in references), references


@pytest.mark.parametrize("page", PAGES)
def test_page_has_no_inline_script_or_style(client, page):
    assert parsed(client.get(page).text).inline == []


@pytest.mark.parametrize("page", PAGES)
def test_every_asset_a_page_references_is_served(client, page):
    references = parsed(client.get(page).text).references
    assert {r: client.get(r).status_code for r in references} == dict.fromkeys(references, 200)


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_asset_is_served_with_its_content_type(client, name):
    expected = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}[name[name.rfind("."):]]
    response = client.get(f"{STATIC_URL}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(expected)


@pytest.mark.parametrize("name", ["index.html", "swagger-initializer.js", "swagger-ui-bundle.js.map", "..%2Fpage.html"])
def test_files_outside_the_asset_list_are_not_served(client, name):
    response = client.get(f"{STATIC_URL}/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("page", PAGES)
def test_page_gets_its_relaxed_content_security_policy(client, page):
    assert client.get(page).headers.get_list("content-security-policy") == [PAGES[page]]


def _other_routes(client) -> list[tuple[str, str]]:
    """Every GET route of the schema without a path parameter, and answers of other kinds."""
    paths = [p for p, ops in client.get("/openapi.json").json()["paths"].items() if "get" in ops and "{" not in p]
    return [("GET", p) for p in paths] + [
        ("GET", "/openapi.json"),
        ("GET", "/no-such-route"),
        ("POST", "/v1/predict"),
        ("GET", "/docs/"),
        ("GET", f"{STATIC_URL}/docs.js"),
        ("GET", f"{STATIC_URL}/swagger-ui-bundle.js"),
        ("GET", f"{STATIC_URL}/nothing"),
    ]


def test_every_other_answer_gets_the_strict_content_security_policy(client):
    policies = {
        f"{method} {path}": client.request(
            method, path, json={"features": IRIS_ROW} if method == "POST" else None, follow_redirects=False
        ).headers.get_list("content-security-policy")
        for method, path in _other_routes(client)
    }
    assert policies == {route: [STRICT_CSP] for route in policies}


def test_an_error_the_middleware_answers_itself_gets_the_strict_policy(client):
    response = client.post("/v1/predict", content=b"[" * 100, headers={"Content-Length": str(10**9)})
    assert response.status_code == 413
    assert response.headers.get_list("content-security-policy") == [STRICT_CSP]


@pytest.mark.parametrize("page", PAGES)
def test_page_needs_no_key_and_holds_no_feature_when_keys_are_required(make_client, demo_models, page):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        response = c.get(page)
    assert response.status_code == 200
    assert not any(feature in response.text for feature in IRIS_ROW)


def test_asset_needs_no_key_when_keys_are_required(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        assert c.get(f"{STATIC_URL}/docs.js").status_code == 200


def test_schema_declares_the_api_key_scheme_when_keys_are_required(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        schema = c.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    assert schema["components"]["securitySchemes"][API_KEY_SCHEME] | {"description": ""} == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "",
    }


@pytest.mark.parametrize(
    ("path", "method", "security"),
    [
        ("/v1/predict", "post", [{API_KEY_SCHEME: []}]),
        ("/v1/models", "get", [{API_KEY_SCHEME: []}]),
        ("/v2/models/{name}/infer", "post", [{API_KEY_SCHEME: []}]),
        ("/healthz", "get", None),
        ("/v2/health/ready", "get", None),
    ],
)
def test_schema_marks_exactly_the_keyed_operations(make_client, demo_models, path, method, security):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        schema = c.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    assert schema["paths"][path][method].get("security") == security


def test_schema_declares_no_key_when_none_is_required(client):
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})


def test_page_script_authorizes_with_the_scheme_the_schema_declares():
    assert f'const API_KEY_SCHEME = "{API_KEY_SCHEME}";' in ASSETS["docs.js"].read_text()
