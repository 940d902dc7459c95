"""The load client's accounting of what a reload of NGINX may cost (scripts/harness/load.py)."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from scripts.harness.load import CLOSED_UNANSWERED, LoadResult

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def closing_server(listener: socket.socket) -> None:
    """Answer one request on a keep-alive connection, then close it after reading the next, unanswered: what an
    NGINX worker retiring on a reload does to a request written at that instant."""
    conn, _ = listener.accept()
    with conn:
        for answer in (RESPONSE, b""):
            data = b""
            while (b"\r\n\r\n" not in data or not data.endswith(b"}")) and (chunk := conn.recv(65536)):
                data += chunk
            if answer:
                conn.sendall(answer)


def test_a_request_on_a_connection_closed_unanswered_is_told_apart_and_spared_once_per_reload():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=closing_server, args=(listener,), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/predict"
        with httpx.Client(timeout=10) as client:
            assert client.post(url, json={}).status_code == 200
            with pytest.raises(httpx.HTTPError) as raised:
                client.post(url, json={})  # the same pooled connection
        server.join(10)
    failure = f"{type(raised.value).__name__}: {raised.value}"  # as ContinuousClient records it
    assert failure.startswith(CLOSED_UNANSWERED), failure

    result = LoadResult(failures=[failure, "503 the service is overloaded", failure, "ReadTimeout: timed out"])
    assert result.failures_beyond_reloads(0) == result.failures
    assert result.failures_beyond_reloads(1) == ["503 the service is overloaded", failure, "ReadTimeout: timed out"]
    assert result.failures_beyond_reloads(5) == ["503 the service is overloaded", "ReadTimeout: timed out"]
