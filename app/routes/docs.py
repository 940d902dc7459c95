"""GET /openapi.json, /docs and /redoc: the API description, behind the API key when keys are required.

The schema names every feature of every model and shows each feature's mean on
the reference sample as its example, so it says as much about a model as a
prediction does: with MLAPI_API_KEY_HASHES set it needs the X-API-Key header
like the prediction routes, and MLAPI_DOCS=off removes the three routes.
"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app.deps import ApiKey
from app.responses import FastJSONResponse
from app.schemas import ERROR_RESPONSES

OPENAPI_URL = "/openapi.json"

router = APIRouter(dependencies=[ApiKey], include_in_schema=False,
                   responses={s: ERROR_RESPONSES[s] for s in (401, 403, 429)})


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> FastJSONResponse:
    schema: dict[str, Any] = request.app.openapi()  # built once, then cached by FastAPI
    return FastJSONResponse(schema)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - Swagger UI")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - ReDoc")
