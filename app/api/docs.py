"""GET /openapi.json, and the pages that show it: /docs (Swagger UI) and /redoc (ReDoc).

The schema names every feature of every model and shows each feature's mean on
the reference sample as its example, so it says as much about a model as a
prediction does: with MLAPI_API_KEY_HASHES set it needs the X-API-Key header
like the prediction routes, and MLAPI_DOCS=off removes every route here.

The pages and their assets hold nothing private, so they need no key: a browser
cannot send a header when a person opens a link. The page fetches the schema
itself (app/static/docs/docs.js) and asks for the key when it answers 401.

Everything the pages load is served from here, pinned by package versions in
requirements.txt (Swagger UI from swagger-ui-bundle-v2, ReDoc's standalone
bundle from fastapi-offline), so the pages work where no CDN can be reached,
and their Content-Security-Policy allows this origin only, no inline script.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from string import Template
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

from app.api.deps import ApiKey
from app.api.schemas import ERROR_RESPONSES
from app.errors import APIError
from app.responses import FastJSONResponse

OPENAPI_URL = "/openapi.json"
STATIC_URL = "/docs/static"
# The name Swagger UI's Authorize button shows; docs.js pre-fills it with the key it was given.
API_KEY_SCHEME = "APIKeyHeader"

# What each page needs and nothing more: scripts and styles from this origin (none inline), images
# from it or data: URIs (the UIs' icons), fetches to this service only. ReDoc's bundle also inserts two
# <style> elements, allowed by their hashes (the empty one that styled-components fills through the
# CSSOM, and perfect-scrollbar's rules; they change only with the pinned ReDoc), and runs its search
# in a worker made from a blob: URL. The assets themselves get the strict policy of every other
# answer: a policy applies to the document, not to the files it loads. The NGINX edge sends the same
# policies (deploy/nginx/snippets/content-security-policy.conf.j2).
SWAGGER_UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
REDOC_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' "
    "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=' 'sha256-QMIg+bpjm3JdElJ388KYke01izlUW0UoNOeKjpMxdgc='; "
    "img-src 'self' data:; connect-src 'self'; worker-src blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# The asset URLs carry no version: revalidate, so that an upgrade never mixes old and new files.
_NO_CACHE = {"Cache-Control": "no-cache"}

_OWN_ASSETS = Path(__file__).resolve().parents[1] / "static" / "docs"
_SWAGGER_UI = Path(str(swagger_ui_path))
_REDOC = Path(str(importlib.resources.files("fastapi_offline") / "static"))

# Only these files are served: a package's other files (a demo index.html, source maps) are not.
ASSETS: dict[str, Path] = {
    "swagger-ui-bundle.js": _SWAGGER_UI / "swagger-ui-bundle.js",
    "swagger-ui.css": _SWAGGER_UI / "swagger-ui.css",
    "favicon-32x32.png": _SWAGGER_UI / "favicon-32x32.png",
    "redoc.standalone.js": _REDOC / "redoc.standalone.js",
    "docs.js": _OWN_ASSETS / "docs.js",
    "docs.css": _OWN_ASSETS / "docs.css",
}

_PAGE = Template((_OWN_ASSETS / "page.html").read_text())


def _page(title: str, ui: str, bundle: str, stylesheets: tuple[str, ...] = ()) -> str:
    links = "\n".join(f'<link rel="stylesheet" href="{STATIC_URL}/{name}">' for name in stylesheets)
    return _PAGE.substitute(title=title, ui=ui, bundle=bundle, stylesheets=links, static=STATIC_URL,
                            openapi_url=OPENAPI_URL)


SWAGGER_PAGE = _page("mlapi - API docs", "swagger", "swagger-ui-bundle.js", ("swagger-ui.css",))
REDOC_PAGE = _page("mlapi - API reference", "redoc", "redoc.standalone.js")


def described(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the X-API-Key scheme on every operation behind the key when keys are required.

    The key is checked by a plain dependency that FastAPI cannot describe; an operation documents 401
    exactly when its router has that dependency, which is how the operations are found.
    """
    schema: dict[str, Any] = app.openapi()  # built once, then cached by FastAPI
    if not app.state.settings.api_keys_required:
        return schema
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    if API_KEY_SCHEME not in schemes:
        schemes[API_KEY_SCHEME] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "One of the keys whose SHA-256 digest is in MLAPI_API_KEY_HASHES.",
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if "401" in operation.get("responses", {}):
                    operation["security"] = [{API_KEY_SCHEME: []}]
    return schema


router = APIRouter(include_in_schema=False)


@router.get(OPENAPI_URL, dependencies=[ApiKey], responses={s: ERROR_RESPONSES[s] for s in (401, 403, 429)})
async def openapi(request: Request) -> FastJSONResponse:
    return FastJSONResponse(described(request.app))


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE, headers={"Content-Security-Policy": SWAGGER_UI_CSP, **_NO_CACHE})


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return HTMLResponse(REDOC_PAGE, headers={"Content-Security-Policy": REDOC_CSP, **_NO_CACHE})


@router.get(STATIC_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise APIError(404, f"no API page asset {name!r}")
    return FileResponse(path, headers=_NO_CACHE)
