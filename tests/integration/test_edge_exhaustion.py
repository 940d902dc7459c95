"""Resource exhaustion at the NGINX edge, as the nginx role configures it (its defaults).

Slow clients (slowloris) must not starve normal ones: NGINX drops a client that takes longer
than client_header_timeout to send its headers, or goes quiet for client_body_timeout in
the middle of a body, and limit_conn caps the connections one address may hold. Bodies are
buffered by NGINX, so a slow or oversized body never occupies the service. Each group of
clients has its own loopback source address, so limits per address apply to it alone.
Everything is bounded: a fixed number of sockets, each phase a fixed number of seconds.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest

from scripts.harness.nginx import ERROR_FIELDS, SERVER_NAME
from scripts.harness.samples import IRIS_BODY
from scripts.harness.servers import wait_for

from edge_service import service_access_lines, service_behind_edge

pytestmark = pytest.mark.integration

# The nginx role's defaults (deploy/ansible/roles/nginx/defaults/main.yml), read from the
# rendered configuration by test_the_edge_runs_with_the_roles_limits.
CLIENT_TIMEOUT_SECONDS = 10
LIMIT_CONN = 50
MAX_BODY_BYTES = 4 * 1024 * 1024

SLOW_HEADER_CLIENTS = 200
SLOW_HEADER_SOURCES = [f"127.0.2.{n}" for n in range(1, 5)]  # 50 sockets per address
SLOW_BODY_CLIENTS = LIMIT_CONN + 10
SLOW_BODY_SOURCE = "127.0.4.1"
NORMAL_SOURCE = "127.0.3.1"
# Slow clients are given up on after this: twice NGINX's timeout, and a bound on the test.
PHASE_SECONDS = 2 * CLIENT_TIMEOUT_SECONDS


@pytest.fixture(scope="module")
def edge_and_service(tmp_path_factory, demo_models):
    with service_behind_edge(tmp_path_factory.mktemp("exhaustion-edge"), demo_models) as pair:
        yield pair


@pytest.fixture(scope="module")
def edge(edge_and_service):
    return edge_and_service[0]


def test_the_edge_runs_with_the_roles_limits(edge):
    """The figures this module relies on are the ones the role rendered."""
    snippets = edge.prefix / "mlapi" / "http"
    limits = (snippets / "client-limits.conf").read_text()
    assert f"client_header_timeout {CLIENT_TIMEOUT_SECONDS}s;" in limits
    assert f"client_body_timeout {CLIENT_TIMEOUT_SECONDS}s;" in limits
    assert "client_max_body_size 4m;" in limits
    site = next((edge.prefix / "sites-enabled").iterdir()).read_text()
    assert f"limit_conn mlapi_conn_per_ip {LIMIT_CONN};" in site


def _tls_socket(edge, source: str) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", edge.https_port), 10, (source, 0))
    return edge.tls_context().wrap_socket(sock, server_hostname=SERVER_NAME)


def _poll(sock: ssl.SSLSocket) -> bytes | None:
    """What the server sent so far without waiting: None if nothing, b"" once it closed or reset.

    Readiness of the raw socket is not enough: TLS 1.3 session tickets arrive as records that
    carry no data."""
    if not select.select([sock], [], [], 0)[0] and not sock.pending():
        return None
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    except (OSError, ssl.SSLError):
        return b""
    finally:
        sock.settimeout(10)


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    return _poll(sock) == b""


@dataclass
class NormalClient:
    """Predictions from their own address, one after another, while slow clients hold theirs."""

    edge: object
    held: object  # () -> number of slow connections open right now
    results: list[tuple[int | str, int]] = field(default_factory=list)  # (status or error, slow ones held)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            held = self.held()
            try:
                outcome: int | str = self.edge.predict(source=NORMAL_SOURCE).status
            except (OSError, ssl.SSLError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            self.results.append((outcome, held))
            self.stop.wait(0.2)  # about 4 requests a second, well under the edge's rate limit

    def __enter__(self) -> NormalClient:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(30)

    def served_while_held(self, at_least: int) -> int:
        return sum(1 for outcome, held in self.results if outcome == 200 and held >= at_least)

    def failures(self) -> list:
        return [outcome for outcome, _ in self.results if outcome != 200]


def test_slow_header_clients_are_dropped_and_do_not_starve_normal_clients(edge):
    slow = [_tls_socket(edge, SLOW_HEADER_SOURCES[i % len(SLOW_HEADER_SOURCES)]) for i in range(SLOW_HEADER_CLIENTS)]
    header = f"POST /v1/predict HTTP/1.1\r\nHost: {SERVER_NAME}\r\nX-Slow: ".encode()
    open_sockets = set(range(len(slow)))
    try:
        for sock in slow:
            sock.sendall(header)
        with NormalClient(edge, held=lambda: len(open_sockets)) as normal:
            deadline = time.monotonic() + PHASE_SECONDS
            while open_sockets and time.monotonic() < deadline:
                for i in list(open_sockets):
                    try:
                        if _closed_by_peer(slow[i]):
                            open_sockets.discard(i)
                        else:
                            slow[i].send(b"a")  # one more byte of a header line that never ends
                    except (OSError, ssl.SSLError):
                        open_sockets.discard(i)
                time.sleep(1)
    finally:
        for sock in slow:
            sock.close()
    assert not open_sockets, (
        f"{len(open_sockets)} of {SLOW_HEADER_CLIENTS} clients still sending headers after {PHASE_SECONDS} s; "
        "NGINX must drop them after client_header_timeout (nginx_client_header_timeout in the nginx role)"
    )
    assert not normal.failures(), f"normal clients failed while slow ones were held: {normal.failures()[:5]}"
    served = normal.served_while_held(at_least=SLOW_HEADER_CLIENTS // 2)
    assert served >= 5, f"only {served} normal predictions while slow clients were held: {normal.results}"


def _slow_body_request(i: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(IRIS_BODY)}\r\nX-Request-ID: slow-body-{i}\r\n\r\n"
    ).encode() + IRIS_BODY[:1]


def _rest_of_head(sock: ssl.SSLSocket, start: bytes) -> bytes:
    data = start
    try:
        while data and b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    return data[len(start):]


def test_slow_body_clients_are_capped_per_address_held_off_the_service_and_dropped(edge_and_service):
    edge, service = edge_and_service
    slow = [_tls_socket(edge, SLOW_BODY_SOURCE) for _ in range(SLOW_BODY_CLIENTS)]
    held = set(range(len(slow)))
    refused: list[bytes] = []
    try:
        for i, sock in enumerate(slow):
            sock.sendall(_slow_body_request(i))
            # Below the edge's request rate (20 r/s), so that only limit_conn can refuse one.
            time.sleep(0.06)
        with NormalClient(edge, held=lambda: len(held)) as normal:
            # Trickle one byte a second to each: the body never ends, the body timeout never fires.
            sent = 1
            for _ in range(CLIENT_TIMEOUT_SECONDS // 2):
                time.sleep(1)
                for i in list(held):
                    answer = _poll(slow[i])
                    if answer is None:
                        slow[i].send(IRIS_BODY[sent:sent + 1])
                    else:
                        refused.append(answer + _rest_of_head(slow[i], answer))
                        held.discard(i)
                sent += 1
            # Then go quiet: NGINX must give the connections back after client_body_timeout.
            deadline = time.monotonic() + PHASE_SECONDS
            while held and time.monotonic() < deadline:
                time.sleep(1)
                held -= {i for i in held if _closed_by_peer(slow[i])}
    finally:
        for sock in slow:
            sock.close()
    assert len(refused) == SLOW_BODY_CLIENTS - LIMIT_CONN, (
        f"{len(refused)} of {SLOW_BODY_CLIENTS} connections from one address refused; "
        f"limit_conn must hold it to {LIMIT_CONN} (nginx_limit_conn in the nginx role)"
    )
    assert all(head.startswith(b"HTTP/1.1 429 ") and b"application/json" in head for head in refused), refused[:3]
    error_log = (edge.prefix / "log" / "error.log").read_text().splitlines()
    by_limit_conn = [line for line in error_log if "limiting connections" in line and SLOW_BODY_SOURCE in line]
    assert len(by_limit_conn) == len(refused), error_log[-20:]
    assert not held, (
        f"{len(held)} clients that went quiet mid-body still connected after {PHASE_SECONDS} s; "
        "NGINX must drop them after client_body_timeout (nginx_client_body_timeout in the nginx role)"
    )
    assert not normal.failures(), f"normal clients failed while slow ones were held: {normal.failures()[:5]}"
    assert normal.served_while_held(at_least=LIMIT_CONN) >= 5, normal.results
    # NGINX buffers request bodies: an unfinished one never reached the service.
    reached = [e for e in service_access_lines(service)
               if str(e.get("client_request_id") or "").startswith("slow-body-")]
    assert not reached, reached[:3]


def _huge_upload(edge, request_id: str, chunked: bool) -> tuple[int, bytes]:
    """Start a 100 MB upload and read the answer NGINX gives before the body is through."""
    total = 100 * 1024 * 1024
    sock = _tls_socket(edge, NORMAL_SOURCE)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    sock.sendall(
        f"POST /v1/predict/batch HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\nX-Request-ID: {request_id}\r\n\r\n".encode()
    )
    chunk = b"[1.0, 1.0, 1.0, 1.0], " * 2978  # about 64 KiB
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
    response = b""
    sent = 0
    try:
        while sent < total:
            answer = _poll(sock)
            if answer is not None:
                response = answer
                break
            sock.sendall(frame)
            sent += len(chunk)
    except (OSError, ssl.SSLError):
        pass  # NGINX answered and closed while the body was still coming
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()
    assert sent < total, "NGINX read the whole 100 MB body without answering"
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mb_body_gets_413_from_the_edge_and_never_reaches_the_service(edge_and_service, chunked):
    edge, service = edge_and_service
    request_id = f"huge-body-{'chunked' if chunked else 'length'}"
    status, body = _huge_upload(edge, request_id, chunked)
    assert status == 413, body[:500]
    error = json.loads(body)["error"]
    assert set(error) == ERROR_FIELDS
    assert error["code"] == "payload_too_large"
    # The service's log is read correctly: a request that did reach it is there.
    assert edge.predict(source=NORMAL_SOURCE, headers={"X-Request-ID": f"{request_id}-control"}).status == 200
    ids: set = set()

    def control_logged() -> bool:
        ids.update(e.get("client_request_id") for e in service_access_lines(service))
        return f"{request_id}-control" in ids

    wait_for(control_logged, 30, what="the service's access log line of a request that reached it")
    assert request_id not in ids
