"""One JSON error shape for every error the service returns.

``{"error": {"code": ..., "message": ..., "request_id": ..., "details": [...]}}``
on /v1 and everywhere else; the Open Inference Protocol (/v2) and KServe's V1
protocol (``/v1/models/{name}:predict``) want ``{"error": "..."}`` instead, so
their routes get that.
"""

from __future__ import annotations

import difflib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from slowapi.errors import RateLimitExceeded
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.logs import get_logger, request_id_var
from app.responses import FastJSONResponse

log = get_logger("errors")

_STATUS_CODES = {
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
        self.code = code or _STATUS_CODES.get(status, "error")
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def protocol_error_shape(path: str) -> bool:
    """Whether ``path`` belongs to a protocol whose errors are ``{"error": "..."}``."""
    return path.startswith("/v2") or path.endswith(":predict")


def error_body(path: str, code: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    if protocol_error_shape(path):
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in details)
        return {"error": f"{message} ({detail})" if detail else message}
    return {"error": {"code": code, "message": message, "request_id": request_id_var.get(), "details": details}}


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> FastJSONResponse:
    body = error_body(path, code or _STATUS_CODES.get(status, "error"), message, details or [])
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
            request.url.path, exc.status, exc.message, code=exc.code, details=exc.details, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                request.url.path,
                400,
                "the request body is not valid JSON",
                code="malformed_json",
                details=validation_details(errors),
            )
        too_long = [e for e in errors if e.get("type") == "too_long" and tuple(e.get("loc", ()))[-1:] == ("instances",)]
        if too_long:
            limit = (too_long[0].get("ctx") or {}).get("max_length")
            return error_response(
                request.url.path,
                413,
                f"too many instances in one request: the limit is {limit}; split the batch",
                details=validation_details(too_long),
            )
        return error_response(
            request.url.path,
            422,
            "the request body does not match the schema; see details for each field",
            details=validation_details(errors),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else _STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
            if request.app.state.settings.docs == "on":
                message += "; see /docs for the API"
        return error_response(request.url.path, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RateLimitExceeded)
    async def _rate_limited(request: Request, exc: RateLimitExceeded) -> FastJSONResponse:
        from app.metrics import RATE_LIMITED

        route = getattr(request.scope.get("route"), "path", request.url.path)
        RATE_LIMITED.labels(route).inc()
        retry_after = _retry_after(request)
        return error_response(
            request.url.path,
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
