"""The outermost layer of every request: request id, body size limit, access log, metrics, last-resort 500.

A pure ASGI middleware (no BaseHTTPMiddleware) so it adds little to each request.

Request ids: the id that keys the logs is the service's own, or the edge's (X-Request-ID) when a trusted
proxy sent the request. A client's X-Request-ID is never that key, since two clients may send the same
one; it is kept beside it as ``client_request_id`` (relayed by the edge as X-Client-Request-ID) and
returned in the X-Client-Request-ID response header.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import STATUS_CODES, error_body, error_shape
from app.logs import ACCESS_LOGGER, get_logger, request_id_var
from app.metrics import LATENCY, REQUESTS, labelled

access_log = logging.getLogger(ACCESS_LOGGER)
log = get_logger("http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
GRPC_SERVICE = "inference.GRPCInferenceService"
UNMATCHED = "unmatched"  # route label for 404s, so random paths do not grow the metrics
# The answers are JSON or text, never pages, so the policy allows nothing; the API pages
# (app/api/docs.py) set their own. The edge sends the same (deploy/nginx/snippets).
_CSP = b"content-security-policy"
STRICT_CSP_HEADER = (_CSP, b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def new_request_id() -> str:
    """32 hex characters. Not a secret, so no system call per request (uuid4 reads os.urandom);
    the random module reseeds itself in every forked worker."""
    return f"{random.getrandbits(128):032x}"


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's body parsing passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes; send fewer instances per request")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _token(scope: Scope, name: bytes) -> str | None:
    """A request-id header when it is a plain token (safe in a JSON body, a header and a log line)."""
    value = _header(scope, name)
    return value if value and _REQUEST_ID.match(value) else None


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        access_log_enabled: bool = True,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.access_log_enabled = access_log_enabled
        networks = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)

        @lru_cache(maxsize=1024)
        def trusted(host: str) -> bool:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(address in network for network in networks)

        self._trusted = trusted

    def _from_trusted_proxy(self, scope: Scope) -> bool:
        """Whether a proxy of MLAPI_TRUSTED_PROXIES sent the request.

        When it sent X-Forwarded-For, the server (gunicorn's forwarded_allow_ips, the same list) has
        already replaced its address with the client's, with port 0: no TCP peer has port 0, so that
        marks a request a trusted proxy forwarded. Otherwise the peer's own address decides.
        """
        client = scope.get("client")
        if not client:
            return False
        host, port = client
        if port == 0 and _header(scope, b"x-forwarded-for") is not None:
            return True
        return self._trusted(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        incoming = _token(scope, b"x-request-id")
        if self._from_trusted_proxy(scope):
            request_id = incoming or new_request_id()
            client_request_id = _token(scope, b"x-client-request-id")
        else:
            request_id = new_request_id()
            client_request_id = incoming
        token = request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_request_id
        state["started"] = start  # the prediction log's latency counts from here
        id_headers = [(b"x-request-id", request_id.encode("latin-1"))]
        if client_request_id is not None:
            id_headers.append((b"x-client-request-id", client_request_id.encode("latin-1")))
        # slowapi reads this after the endpoint even when its store failed and set nothing.
        state["view_rate_limit"] = None
        status_holder = {"status": 500, "started": False}
        path = scope.get("path", "")

        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._send_error(scope, send, 413, self._too_large_message(), id_headers)
            status_holder["status"] = 413
            self._finish(scope, state, 413, start)
            request_id_var.reset(token)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                headers = message.get("headers", [])
                if any(name == _CSP for name, _ in headers):
                    message["headers"] = [*headers, *id_headers]
                else:
                    message["headers"] = [*headers, *id_headers, STRICT_CSP_HEADER]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except BodyTooLarge:
            if not status_holder["started"]:
                await self._send_error(scope, send, 413, self._too_large_message(), id_headers)
            status_holder["status"] = 413
        except Exception:
            # Never a stack trace to the client: it goes to the log with the request id.
            log.exception("unhandled error", extra={"path": path, "method": scope.get("method")})
            if not status_holder["started"]:
                await self._send_error(
                    scope, send, 500, f"internal error; quote request id {request_id} when reporting it", id_headers
                )
            status_holder["status"] = 500
        finally:
            self._finish(scope, state, status_holder["status"], start)
            request_id_var.reset(token)

    def _too_large_message(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes; send fewer instances per request"

    async def _send_error(
        self, scope: Scope, send: Send, status: int, message: str, id_headers: list[tuple[bytes, bytes]]
    ) -> None:
        body = orjson.dumps(error_body(error_shape(scope), STATUS_CODES[status], message, []))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *id_headers,
                    STRICT_CSP_HEADER,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope: Scope, state: dict[str, Any], status: int, start: float) -> None:
        duration = time.perf_counter() - start
        route = scope.get("route")
        route_path = getattr(route, "path", None) or UNMATCHED
        # An RPC of the gRPC protocol (app/rpc/) is served as the REST call of the same meaning.
        rpc = scope.get("extensions", {}).get("mlapi.rpc")
        method = "GRPC" if rpc else scope.get("method", "")
        model = state.get("model", "")
        version = state.get("version", "")
        labels = (route_path, method, str(status), model, version)
        labelled(REQUESTS, *labels).inc()
        labelled(LATENCY, *labels).observe(duration)
        if self.access_log_enabled:
            client = scope.get("client")
            access_log.info(
                "request",
                extra={
                    "request_id": state.get("request_id"),
                    "client_request_id": state.get("client_request_id"),
                    "client_ip": client[0] if client else None,
                    "method": method,
                    "path": scope.get("path"),
                    "route": route_path,
                    "status": status,
                    "duration_ms": round(duration * 1000, 3),
                    "model": model or None,
                    "version": version or None,
                    "engine": state.get("engine"),
                    "user_agent": _header(scope, b"user-agent"),
                    **({"rpc": f"{GRPC_SERVICE}/{rpc}"} if rpc else {}),
                },
            )
