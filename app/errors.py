"""The service's JSON errors, in the shape the route's router chose.

``{"error": {"code": ..., "message": ..., "request_id": ..., "details": [...]}}`` (ErrorShape.SERVICE) on
/v1 and everywhere else; the Open Inference Protocol (/v2) and KServe's V1 protocol
(``/v1/models/{name}:predict``) want ``{"error": "..."}`` (ErrorShape.PROTOCOL), so their routers mark their
routes with it (``shape_errors``). No URL is named here: an error takes the shape of the route that serves, or
would serve, the request (``ErrorShapes``).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from slowapi.errors import RateLimitExceeded
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from app.logs import get_logger, request_id_var
from app.responses import FastJSONResponse

log = get_logger("errors")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "not_ready",
}


class APIError(Exception):
    """An error with a status, a stable code, a message for people and per-field details."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or STATUS_CODES.get(status, "error")
        self.message = message
        self.details = details or []
        self.headers = headers or {}


class ErrorShape(enum.Enum):
    """How a route writes its errors."""

    SERVICE = "service"  # {"error": {"code", "message", "request_id", "details"}}
    PROTOCOL = "protocol"  # {"error": "message (field: problem; ...)"}, as the inference protocols define it


def shape_errors(routes: Iterable[BaseRoute], shape: ErrorShape) -> None:
    """Mark routes (a router's, or single ones) with the shape of their errors; unmarked routes use SERVICE."""
    for route in routes:
        route.error_shape = shape  # type: ignore[attr-defined]


def route_shape(route: BaseRoute) -> ErrorShape:
    shape: ErrorShape = getattr(route, "error_shape", ErrorShape.SERVICE)
    return shape


class ErrorShapes:
    """The error shape of a request to one app that no route has taken (yet).

    One refused before routing (a body too large by its Content-Length, a worker at its concurrency limit)
    takes the shape of the route it would have reached; a path no route takes (a 404) the shape every route
    under its first path segment shares (/v2/... is all Open Inference Protocol), else SERVICE. create_app
    builds one from the routes of the routers it includes.
    """

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self.routes = list(routes)
        by_segment: dict[str, set[ErrorShape]] = {}
        for route in self.routes:
            path = getattr(route, "path", "")
            by_segment.setdefault(_first_segment(path), set()).add(route_shape(route))
        self._segments = {segment: shapes.pop() for segment, shapes in by_segment.items() if len(shapes) == 1}

    def unrouted(self, scope: Scope) -> ErrorShape:
        if scope.get("type") == "http":
            # As Starlette routes: the first full match, else the first route whose path matches (a 405).
            partial = None
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match is Match.FULL:
                    return route_shape(candidate)
                if match is Match.PARTIAL and partial is None:
                    partial = candidate
            if partial is not None:
                return route_shape(partial)
        return self._segments.get(_first_segment(scope.get("path", "")), ErrorShape.SERVICE)


def _first_segment(path: str) -> str:
    return path.lstrip("/").partition("/")[0]


def error_shape(scope: Scope) -> ErrorShape:
    """The shape of this request's errors: its route's once routed; SERVICE outside an app of create_app."""
    route = scope.get("route")
    if route is not None:
        return route_shape(route)
    shapes = getattr(getattr(scope.get("app"), "state", None), "error_shapes", None)
    return shapes.unrouted(scope) if shapes is not None else ErrorShape.SERVICE


def error_body(shape: ErrorShape, code: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    if shape is ErrorShape.PROTOCOL:
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in details)
        return {"error": f"{message} ({detail})" if detail else message}
    return {"error": {"code": code, "message": message, "request_id": request_id_var.get(), "details": details}}


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> FastJSONResponse:
    body = error_body(error_shape(request.scope), code or STATUS_CODES.get(status, "error"), message, details or [])
    return FastJSONResponse(body, status_code=status, headers=headers)


def _clean_loc(loc: tuple[Any, ...]) -> list[Any]:
    # Union branches show up in locations as type tags (e.g. "function-after[...]"); drop them.
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    details = []
    for err in errors:
        item: dict[str, Any] = {"loc": _clean_loc(tuple(err.get("loc", ()))), "msg": err.get("msg", "invalid")}
        if err.get("type"):
            item["type"] = err["type"]
        details.append(item)
    _suggest_names(details)
    return details


def _suggest_names(details: list[dict[str, Any]]) -> None:
    """For a misspelled field, name the missing field it was probably meant to be."""
    missing: dict[tuple[Any, ...], list[str]] = {}
    for d in details:
        if d.get("type") == "missing" and d["loc"]:
            missing.setdefault(tuple(d["loc"][:-1]), []).append(str(d["loc"][-1]))
    for d in details:
        if d.get("type") != "extra_forbidden" or not d["loc"]:
            continue
        unknown = str(d["loc"][-1])
        candidates = missing.get(tuple(d["loc"][:-1]), [])
        close = difflib.get_close_matches(unknown, candidates, n=1, cutoff=0.6)
        d["msg"] = f"unknown field {unknown!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> FastJSONResponse:
        return error_response(
            request, exc.status, exc.message, code=exc.code, details=exc.details, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                request,
                400,
                "the request body is not valid JSON",
                code="malformed_json",
                details=validation_details(errors),
            )
        too_long = [e for e in errors if e.get("type") == "too_long" and tuple(e.get("loc", ()))[-1:] == ("instances",)]
        if too_long:
            limit = (too_long[0].get("ctx") or {}).get("max_length")
            return error_response(
                request,
                413,
                f"too many instances in one request: the limit is {limit}; split the batch",
                details=validation_details(too_long),
            )
        return error_response(
            request,
            422,
            "the request body does not match the schema; see details for each field",
            details=validation_details(errors),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
            if request.app.state.settings.docs == "on":
                message += "; see /docs for the API"
        return error_response(request, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RateLimitExceeded)
    async def _rate_limited(request: Request, exc: RateLimitExceeded) -> FastJSONResponse:
        from app.metrics import RATE_LIMITED

        route = getattr(request.scope.get("route"), "path", request.url.path)
        RATE_LIMITED.labels(route).inc()
        retry_after = _retry_after(request)
        return error_response(
            request,
            429,
            f"rate limit exceeded: {exc.detail}; retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def _retry_after(request: Request) -> int:
    """Seconds until the window that refused this request resets (at least 1)."""
    current = getattr(request.state, "view_rate_limit", None)
    if current is None:
        return 1
    return retry_after(request.app.state.limiter.limiter, current[0], current[1])


def retry_after(strategy: Any, item: Any, identifiers: Any) -> int:
    """Seconds until the window of ``item`` for ``identifiers`` resets (at least 1)."""
    import time

    try:
        reset_at, _remaining = strategy.get_window_stats(item, *identifiers)
    except Exception:  # the store may be gone; a retry hint is still better than none
        return 1
    return max(1, int(reset_at - time.time()) + 1)
