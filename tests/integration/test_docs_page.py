"""The API pages as a person sees them: headless Chromium opens https://api.mlapi.test/docs and /redoc
through the NGINX edge rendered by the role, in front of real gunicorn workers.

Screenshots are kept under .cache/integration/ (their paths are printed) to look at what the page shows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from scripts.harness.servers import ROOT

from chromium import Browser
from edge_service import SERVER_NAME, service_behind_edge

pytestmark = pytest.mark.integration

SCREENSHOTS = ROOT / ".cache" / "integration"
KEY = "a-key-for-the-docs-page"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()
# The texts of the page's innermost elements, quotes taken off (ReDoc shows names in JSON samples): a
# feature is shown when one of them is its name. innerText would not do: Swagger UI runs a property's
# name into the text of the button beside it, and short names such as "age" are parts of other words.
SHOWN_NAMES = ("new Set([...document.querySelectorAll('body *')].filter((e) => e.children.length === 0)"
               ".map((e) => e.textContent.trim().replace(/^\"(.*)\"$/, '$1')))")
FEATURES_SHOWN = "((names) => {features}.every((f) => names.has(f)))(" + SHOWN_NAMES + ")"
KEY_FORM_SHOWN = "!document.getElementById('api-key-form').hidden"


def feature_names(models: Path) -> list[str]:
    """Every feature of every demo model, from the packages' manifests."""
    names = set()
    for manifest in models.glob("*/*/manifest.json"):
        names.update(f["name"] for f in json.loads(manifest.read_text())["features"])
    return sorted(names)


def shot(browser: Browser, name: str, full_page: bool = False) -> Path:
    path = browser.screenshot(SCREENSHOTS / name, full_page)
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def features(demo_models) -> list[str]:
    names = feature_names(demo_models)
    assert len(names) >= 10  # iris' four and diabetes' ten, at least
    return names


@pytest.fixture(scope="module")
def open_edge(tmp_path_factory, demo_models):
    with service_behind_edge(tmp_path_factory.mktemp("docs-edge"), demo_models) as (edge, _):
        yield edge


@pytest.fixture(scope="module")
def keyed_edge(tmp_path_factory, demo_models):
    with service_behind_edge(tmp_path_factory.mktemp("docs-keyed-edge"), demo_models,
                             service_env={"MLAPI_API_KEY_HASHES": KEY_HASH}) as (edge, _):
        yield edge


def _browser(edge, tmp_path):
    return Browser(tmp_path / "chromium", {SERVER_NAME: "127.0.0.1"}, edge.certificate)


@pytest.fixture
def browser(open_edge, tmp_path):
    b = _browser(open_edge, tmp_path)
    yield b
    b.close()


@pytest.fixture
def keyed_browser(keyed_edge, tmp_path):
    b = _browser(keyed_edge, tmp_path)
    yield b
    b.close()


def url(edge, path: str) -> str:
    return f"https://{SERVER_NAME}:{edge.https_port}{path}"


def test_docs_page_shows_every_models_features_through_the_edge(browser, open_edge, features):
    browser.open(url(open_edge, "/docs"))
    browser.wait_for(FEATURES_SHOWN.format(features=json.dumps(features)), f"/docs to show {features}")
    shot(browser, "docs-page.png", full_page=True)  # the features are in the Schemas section at the end


def test_docs_page_loads_nothing_its_policy_refuses(browser, open_edge, features):
    browser.open(url(open_edge, "/docs"))
    browser.wait_for(FEATURES_SHOWN.format(features=json.dumps(features)), "/docs to render")
    assert browser.csp_violations() == []


def test_redoc_page_shows_every_models_features_through_the_edge(browser, open_edge, features):
    browser.open(url(open_edge, "/redoc"))
    browser.wait_for(FEATURES_SHOWN.format(features=json.dumps(features)), f"/redoc to show {features}")
    shot(browser, "redoc-page.png")


def test_redoc_page_is_refused_only_its_vendors_logo(browser, open_edge, features):
    browser.open(url(open_edge, "/redoc"))
    browser.wait_for(FEATURES_SHOWN.format(features=json.dumps(features)), "/redoc to render")
    # ReDoc's sidebar links a logo from its CDN and hides it when the load fails; nothing else may be refused.
    assert set(browser.csp_violations()) <= {"img-src https://cdn.redoc.ly/redoc/logo-mini.svg"}


def test_docs_page_asks_for_the_key_when_keys_are_required(keyed_browser, keyed_edge, features):
    keyed_browser.open(url(keyed_edge, "/docs"))
    keyed_browser.wait_for(KEY_FORM_SHOWN, "/docs to ask for the key")
    shot(keyed_browser, "docs-page-asks-for-the-key.png")
    text = keyed_browser.text()
    assert "This API needs a key" in text and "X-API-Key" in text
    assert set(keyed_browser.evaluate(f"[...{SHOWN_NAMES}]")).isdisjoint(features)


def test_docs_page_shows_the_features_once_the_key_is_given(keyed_browser, keyed_edge, features):
    keyed_browser.open(url(keyed_edge, "/docs"))
    keyed_browser.wait_for(KEY_FORM_SHOWN, "/docs to ask for the key")
    keyed_browser.type_into("#api-key", KEY)
    keyed_browser.click("#api-key-form button[type=submit]")
    keyed_browser.wait_for(FEATURES_SHOWN.format(features=json.dumps(features)), "/docs to show the features")
    shot(keyed_browser, "docs-page-with-the-key.png", full_page=True)


def test_docs_page_authorizes_try_it_out_with_the_given_key(keyed_browser, keyed_edge):
    keyed_browser.open(url(keyed_edge, "/docs"))
    keyed_browser.wait_for(KEY_FORM_SHOWN, "/docs to ask for the key")
    keyed_browser.type_into("#api-key", KEY)
    keyed_browser.click("#api-key-form button[type=submit]")
    # Swagger UI draws its Authorize button locked once a scheme holds a key.
    keyed_browser.wait_for("document.querySelector('.btn.authorize.locked') !== null", "the Authorize button to lock")


def test_docs_page_says_when_the_key_is_refused(keyed_browser, keyed_edge):
    keyed_browser.open(url(keyed_edge, "/docs"))
    keyed_browser.wait_for(KEY_FORM_SHOWN, "/docs to ask for the key")
    keyed_browser.type_into("#api-key", "not-the-key")
    keyed_browser.click("#api-key-form button[type=submit]")
    keyed_browser.wait_for("document.getElementById('api-key-message').textContent.includes('refused')",
                           "/docs to say that the key was refused")
