"""API keys and the client identity that rate limits are keyed by."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from slowapi import Limiter
from starlette.requests import Request

from app.errors import APIError
from app.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key(request: Request, settings: Settings) -> None:
    """401 without a key, 403 with a wrong one; the key itself is never stored or logged.

    Every configured digest is compared in constant time, so timing tells nothing
    about which digest came close.
    """
    if not settings.api_keys_required:
        return
    presented = request.headers.get("x-api-key")
    if not presented:
        raise APIError(
            401,
            "an API key is required: send it in the X-API-Key header",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    digest = key_digest(presented)
    matched = False
    for accepted in settings.api_key_hashes:
        matched |= hmac.compare_digest(digest, accepted)
    if not matched:
        raise APIError(403, "the API key in X-API-Key is not accepted")
    # Rate limits are per key: identify it by a digest prefix, never by the key.
    request.state.client_key = "key:" + digest[:16]


def rate_limit_key(request: Request) -> str:
    """The API key when one was accepted, else the client IP.

    The client IP is the TCP peer, rewritten from X-Forwarded-For by the server
    only when the peer is one of MLAPI_TRUSTED_PROXIES (gunicorn's
    forwarded_allow_ips): a spoofed header from anyone else changes nothing.
    """
    key = getattr(request.state, "client_key", None)
    if key:
        return key
    client = request.client
    return "ip:" + (client.host if client else "unknown")


def shared_limit(request_limiter: Limiter, settings: Settings, value: str, scope: str) -> Callable[[F], F]:
    """slowapi's limit shared by every route it decorates under ``scope``.

    With limits off, routes get no wrapper at all: slowapi's costs time per
    request even when disabled.
    """
    if not settings.rate_limit_enabled:
        return lambda func: func
    return request_limiter.shared_limit(value, scope=scope)
