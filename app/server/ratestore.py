"""The shared rate-limit store behind a circuit breaker: a slow or lost store costs a request a bounded time.

slowapi checks every limit against the store (Redis in production) on the request path. With redis-py's
defaults, a store that hangs (it accepts connections and never answers) or whose host is powered off holds
each request for seconds of socket timeouts and retries, longer than NGINX waits: every prediction fails.
Here each store call has short socket timeouts and no retry, and one failure opens the breaker: for
``rate_limit_store_retry_seconds`` the store is not asked at all, requests go on without limits (logged once,
counted per request), and then the next request tries it again.

The store's address, which may carry a password, never leaves this process: log lines, metrics and health
answers name the store only as "the rate-limit store".
"""

from __future__ import annotations

import threading
import time
from typing import Any

from limits.storage import RedisStorage

from app.logs import get_logger
from app.metrics import RATE_LIMIT_BYPASSED, RATE_LIMIT_STORE_FAILURES, RATE_LIMIT_STORE_UP
from app.settings import Settings

log = get_logger("ratestore")

_SCHEME_PREFIX = "mlapi+"


class StoreBreaker:
    """Closed while the store answers; open for ``cooldown`` seconds after any failure."""

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self._open_until = 0.0
        self._lock = threading.Lock()
        self.up: bool | None = None  # unknown until the first call

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._open_until = time.monotonic() + self.cooldown
            was_up, self.up = self.up, False
        RATE_LIMIT_STORE_FAILURES.labels(type(exc).__name__).inc()
        RATE_LIMIT_STORE_UP.set(0)
        if was_up is not False:
            # The exception's text may hold the store's address, never its password; the class says enough.
            log.warning(
                "rate-limit store does not answer: requests go on without rate limits",
                extra={"error": type(exc).__name__, "retry_in_seconds": self.cooldown},
            )

    def succeeded(self) -> None:
        if self.up is True:
            return
        with self._lock:
            was_up, self.up = self.up, True
        RATE_LIMIT_STORE_UP.set(1)
        if was_up is False:
            log.info("rate-limit store answers again: rate limits apply")


class GuardedRedisStorage(RedisStorage):
    """limits' Redis storage whose every call goes through a :class:`StoreBreaker`.

    Registered with limits under ``mlapi+redis://`` (and rediss, redis+unix) so that slowapi builds it from
    the store URI like any storage. A call that fails, or is not made because the breaker is open, answers as
    an empty store would: the request is within its limits.
    """

    # Declared by limits's Storage as an instance attribute, set per class.
    STORAGE_SCHEME = [_SCHEME_PREFIX + s for s in ("redis", "rediss", "redis+unix")]  # noqa: RUF012

    def __init__(self, uri: str, breaker: StoreBreaker, **options: Any) -> None:
        self.breaker = breaker
        super().__init__(uri.removeprefix(_SCHEME_PREFIX), **options)
        base = self.base_exceptions
        # What a failed call raises: the client library's errors, and the socket's.
        self._failures: tuple[type[BaseException], ...] = (*(base if isinstance(base, tuple) else (base,)), OSError)

    def _guarded(self, call: Any, *args: Any, fallback: Any, **kwargs: Any) -> Any:
        if self.breaker.open:
            RATE_LIMIT_BYPASSED.inc()
            return fallback() if callable(fallback) else fallback
        try:
            result = call(*args, **kwargs)
        except self._failures as exc:
            self.breaker.failed(exc)
            RATE_LIMIT_BYPASSED.inc()
            return fallback() if callable(fallback) else fallback
        self.breaker.succeeded()
        return result

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._guarded(super().incr, key, expiry, amount=amount, fallback=0)

    def get(self, key: str) -> int:
        return self._guarded(super().get, key, fallback=0)

    def get_expiry(self, key: str) -> float:
        return self._guarded(super().get_expiry, key, fallback=time.time)

    def clear(self, key: str) -> None:
        return self._guarded(super().clear, key, fallback=None)

    def check(self) -> bool:
        """A PING, unless the breaker is open; also what /healthz/store and /metrics report."""
        if self.breaker.open:
            return False
        try:
            ok = bool(self.get_connection().ping())
        except self._failures as exc:
            self.breaker.failed(exc)
            return False
        self.breaker.succeeded()
        return ok


class RateStore:
    """What the app knows about its rate-limit store: how slowapi reaches it, and whether it answers."""

    def __init__(self, settings: Settings) -> None:
        uri = settings.rate_limit_storage_uri
        self.shared = settings.rate_limit_enabled and not uri.startswith("memory://")
        self.breaker = StoreBreaker(settings.rate_limit_store_retry_seconds)
        self.options: dict[str, Any] = {}
        self.uri = uri
        if self.shared:
            # Imported here, as limits does: redis is needed only with a shared store.
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self.uri = _SCHEME_PREFIX + uri
            timeout = settings.rate_limit_store_timeout_seconds
            self.options = {
                "breaker": self.breaker,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                # One try: the breaker, not a retry loop, decides when to ask again.
                "retry": Retry(NoBackoff(), 0),
            }

    def check(self, storage: Any) -> bool:
        """Whether the store answers now (memory:// always does)."""
        if not self.shared:
            return True
        return bool(storage.check())
