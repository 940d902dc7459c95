"""The gunicorn worker: a uvicorn worker that retires without dropping requests and sheds overload.

A worker retires when it is recycled (``MLAPI_MAX_REQUESTS``), replaced on reload (SIGHUP to the
master) or stopped. Uvicorn then closes every idle kept-alive connection at once, but "idle" only
means no request has been read yet: a client that has just sent one on that connection gets the
connection closed instead of an answer. Here a retiring worker keeps each idle connection open for
``MLAPI_RETIRE_GRACE`` seconds; a request that arrives meanwhile is served with ``Connection: close``,
so the client reconnects (to another worker) for the next one, and no connection is ever closed
with a request in flight. Uvicorn's shutdown already waits for the connections to close, bounded by
gunicorn's graceful timeout.

A worker also answers 503 at once, in the service's JSON error shape, when it holds more than
``MLAPI_LIMIT_CONCURRENCY`` connections or requests, instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from app.errors import error_body, error_shape
from app.metrics import OVERLOADED
from app.settings import get_settings

OVERLOADED_MESSAGE = "the service is at its concurrency limit; retry after the number of seconds in Retry-After"


async def overloaded(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The answer of a worker at its limit: cheap, and closing the connection sheds its load.

    It runs in the service's place, before the service sees the request: the protocol puts the service's app
    in the scope, as Starlette would, so that the answer takes the shape of the route it would have reached."""
    OVERLOADED.inc()
    body = orjson.dumps(error_body(error_shape(scope), "overloaded", OVERLOADED_MESSAGE, []))
    await send({
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": body})


class GracefulHttpToolsProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol with a graceful retirement and the service's overload answer."""

    retire_grace: float = 1.0  # set by GracefulWorker from the settings
    concurrency_limit: int | None = None
    master_pid: int = 0
    service: Any = None  # the app the worker loaded (GracefulWorker.run): its routes shape the overload answer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own check answers in plain text; on_headers_complete checks
        self._retiring = False
        self._reading_request = False
        self._retire_timer: asyncio.TimerHandle | None = None

    def _idle(self) -> bool:
        return not self._reading_request and (self.cycle is None or self.cycle.response_complete)

    def shutdown(self) -> None:
        self._retiring = True
        if not self._idle():
            if self.cycle is not None:
                self.cycle.keep_alive = False  # the response in progress says Connection: close
            return
        if os.getppid() != self.master_pid:
            # The master is gone (the worker was told by PR_SET_PDEATHSIG): a new one may already be emptying the
            # instance's metrics folder, so take no new request; NGINX retries on an instance that is whole.
            self.transport.close()
            return
        # A request may be on the wire: give it time to arrive and be answered with Connection: close.
        self._unset_keepalive_if_required()
        self._retire_timer = self.loop.call_later(self.retire_grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._retire_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._reading_request = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_request = False
        limit = self.concurrency_limit
        # This connection is one of self.connections; its request is not yet one of self.tasks.
        if limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
            self.scope["app"] = self.service  # type: ignore[typeddict-unknown-key]
            service, self.app = self.app, overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = service
        else:
            super().on_headers_complete()
        if self._retiring and self.cycle is not None:
            self.cycle.keep_alive = False


class GracefulWorker(UvicornWorker):
    """``worker_class`` of app/gunicorn_conf.py."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": GracefulHttpToolsProtocol}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        GracefulHttpToolsProtocol.retire_grace = settings.retire_grace
        GracefulHttpToolsProtocol.concurrency_limit = settings.limit_concurrency or None
        super().__init__(*args, **kwargs)
        GracefulHttpToolsProtocol.master_pid = self.ppid

    def run(self) -> None:
        # The listening sockets go to the event loop as the socket objects gunicorn's wrappers hold. uvloop takes
        # ownership of a socket.socket (libuv closes its descriptor, the object is detached), but closes any other
        # object once more after libuv did: a second close(2) of a descriptor number that another thread of this
        # worker may have just been given (a /metrics render's lock file, a prediction log), while the worker
        # retires with requests still running.
        self.sockets = [getattr(sock, "sock", sock) for sock in self.sockets]  # type: ignore[has-type]
        GracefulHttpToolsProtocol.service = self.wsgi
        super().run()
