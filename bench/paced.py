"""An open-loop HTTP/1.1 client: requests at a fixed offered rate, latency counted from the scheduled send time.

wrk waits for each response before sending the next request on a connection, so a
slow response delays the requests queued behind it and they are never counted
(coordinated omission); wrk2 corrects that but is not packaged in Debian 12. Here a
scheduler releases request i at t0 + i/rate whatever happened before, keep-alive
connections take the released requests in turn, and each latency runs from the
scheduled time to the last byte of the response, so queueing shows in the tail.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class PacedResult:
    offered_rps: float
    achieved_rps: float
    sent: int
    completed: int
    errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _run(
    port: int, path: str, body: bytes, rate: float, duration: float, connections: int,
    host: str, tls: ssl.SSLContext | None,
) -> PacedResult:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    released: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=host if tls else None)

    async def connection() -> None:
        nonlocal errors
        reader, writer = await connect()
        try:
            while (scheduled := await released.get()) is not None:
                try:
                    writer.write(request)
                    status = await _read_response(reader)
                except (ConnectionError, asyncio.IncompleteReadError):
                    # A worker recycled after max_requests closes its idle keep-alive connections:
                    # reconnect and send again, the time lost stays in this request's latency.
                    writer.close()
                    reader, writer = await connect()
                    writer.write(request)
                    status = await _read_response(reader)
                latencies.append(time.perf_counter() - scheduled)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections (and TLS handshakes) before the clock starts
    interval = 1.0 / rate
    start = time.perf_counter()
    sent = 0
    while True:
        now = time.perf_counter()
        if now - start >= duration:
            break
        # Release every request whose time has come, even if the loop woke late.
        while start + sent * interval <= now:
            released.put_nowait(start + sent * interval)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent * interval - time.perf_counter()))
    for _ in workers:
        released.put_nowait(None)
    done, pending = await asyncio.wait(workers, timeout=30)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return PacedResult(
        offered_rps=rate,
        achieved_rps=len(latencies) / elapsed,
        sent=sent,
        completed=len(latencies),
        errors=errors,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        p999_ms=float(np.percentile(ms, 99.9)),
        max_ms=float(ms.max()),
    )


def paced(
    port: int, path: str, body: bytes, rate: float, duration: float, connections: int = 16,
    host: str = "127.0.0.1", cafile: str | None = None,
) -> PacedResult:
    """Offer ``rate`` requests/s for ``duration`` seconds on loopback; HTTPS when ``cafile`` is given."""
    import uvloop

    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    return uvloop.run(_run(port, path, body, rate, duration, connections, host, tls))
