"""API keys and the client identity that rate limits are keyed by."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

from limits import RateLimitItem
from limits import parse as parse_limit
from slowapi import Limiter
from starlette.requests import Request

from app.errors import APIError
from app.logs import get_logger
from app.settings import Settings

log = get_logger("security")

F = TypeVar("F", bound=Callable[..., Any])


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# The scope of the failed-key counters in the limiter's store, next to slowapi's own.
FAILED_KEY_SCOPE = "failed-api-key"


@lru_cache(maxsize=8)
def _limit_item(value: str) -> RateLimitItem:
    return parse_limit(value)


def check_api_key(request: Request, settings: Settings) -> None:
    """401 without a key, 403 with a wrong one; the key itself is never stored or logged.

    Every configured digest is compared in constant time, so timing tells nothing
    about which digest came close. Wrong keys are counted per client in the rate-limit
    store (shared by workers and hosts with Redis): a client over
    MLAPI_API_KEY_FAILURE_LIMIT gets 429 for every request that needs a key until the
    window ends, a right key included, since a right key answered otherwise would tell
    a guess from a miss. This calls the store: run it off the event loop.
    """
    if not settings.api_keys_required:
        return
    strategy = request.app.state.limiter.limiter
    item = _limit_item(settings.api_key_failure_limit)
    identifiers = ("mlapi", FAILED_KEY_SCOPE, rate_limit_key(request))
    if not _ask_store(strategy.test, item, identifiers):
        _refuse_blocked_client(request, strategy, item, identifiers)
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
        _ask_store(strategy.hit, item, identifiers)
        raise APIError(403, "the API key in X-API-Key is not accepted")
    # Rate limits are per key: identify it by a digest prefix, never by the key.
    request.state.client_key = "key:" + digest[:16]


def _ask_store(call: Callable[..., bool], item: RateLimitItem, identifiers: tuple[str, ...]) -> bool:
    """The store's answer; True (not blocked) when it fails: an outage must not lock every client out
    (/readyz reports it), and the keys are still checked."""
    try:
        return call(item, *identifiers)
    except Exception as exc:
        log.warning("failed-key counter unavailable", extra={"error": str(exc)})
        return True


def _refuse_blocked_client(request: Request, strategy: Any, item: RateLimitItem, identifiers: tuple[str, ...]) -> None:
    from app.errors import retry_after
    from app.metrics import RATE_LIMITED

    seconds = retry_after(strategy, item, identifiers)
    RATE_LIMITED.labels(getattr(request.scope.get("route"), "path", request.url.path)).inc()
    raise APIError(
        429,
        f"too many wrong API keys from this client (limit {item}, MLAPI_API_KEY_FAILURE_LIMIT); "
        f"every request that needs a key is refused until the window ends: retry after {seconds} s "
        "with the right key in X-API-Key",
        headers={"Retry-After": str(seconds)},
    )


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
