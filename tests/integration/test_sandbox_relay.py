"""The sandbox relay (scripts/sandbox/relay.py) on loopback: bytes arrive intact and in order, half-closed
connections finish their replies, many connections run at once, and a refused upstream closes the client."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.servers import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "scripts" / "sandbox" / "relay.py"


class EchoServer:
    """Echoes everything until the client half-closes, then closes its own side."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def start_relay(tmp_path: Path, listen_port: int, target_port: int) -> subprocess.Popen:
    ready = tmp_path / "relay.ready"
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), "--ready-file", str(ready),
         f"self,127.0.0.1,{listen_port},self,127.0.0.1,{target_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    for _ in range(100):
        if ready.exists() or proc.poll() is not None:
            break
        threading.Event().wait(0.05)
    assert ready.read_text().strip() == str(proc.pid)
    return proc


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def relay_port(tmp_path: Path, echo: EchoServer) -> Iterator[int]:
    port = free_port()
    proc = start_relay(tmp_path, port, echo.port)
    yield port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while data := conn.recv(1 << 20):
            chunks.append(data)
        sender.join()
    return b"".join(chunks)


def test_a_large_stream_arrives_intact_through_the_relay(relay_port: int) -> None:
    payload = os.urandom(32 << 20)  # far beyond every buffer, so back-pressure must work
    assert round_trip(relay_port, payload) == payload


def test_a_half_closed_connection_still_receives_the_reply(relay_port: int) -> None:
    assert round_trip(relay_port, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"


def test_many_connections_at_once_each_get_their_own_bytes(relay_port: int) -> None:
    payloads = [os.urandom(64 << 10) + str(i).encode() for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda p: round_trip(relay_port, p), payloads))
    assert replies == payloads


def test_a_refused_upstream_closes_the_client_connection(tmp_path: Path) -> None:
    listen_port, dead_port = free_port(), free_port()
    proc = start_relay(tmp_path, listen_port, dead_port)
    try:
        with socket.create_connection(("127.0.0.1", listen_port), timeout=10) as conn:
            try:
                data = conn.recv(1)
            except ConnectionResetError:
                data = b""
        assert data == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_a_rule_it_cannot_listen_on_stops_the_relay_with_a_message(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(RELAY), f"self,127.0.0.1,{port},self,127.0.0.1,9"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
