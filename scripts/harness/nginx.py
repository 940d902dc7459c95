"""Real NGINX in front of real gunicorn instances, on loopback, for the NGINX integration tests.

The configuration is rendered by the nginx role itself (``tasks_from: config``, the same
templates and argument checks as on a host) into a scratch prefix: ports on 127.0.0.1,
paths under the prefix, a self-signed certificate for ``SERVER_NAME``. NGINX and gunicorn
run as child processes and are stopped by PID.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scripts.harness.roles import render_role
from scripts.harness.samples import IRIS_BODY
from scripts.harness.servers import Gunicorn, Process, free_port, mlapi, wait_for

SERVER_NAME = "api.mlapi.test"
ERROR_FIELDS = {"code", "message", "request_id", "details"}



def plain_http_port() -> int:
    """A free port for plain HTTP whose number does not contain "443": gixy takes any listen directive with
    "443" in it for a TLS server and then asks for HSTS on it."""
    port = free_port()
    while "443" in str(port):
        port = free_port()
    return port


def _listening(process: Process, port: int, timeout: float = 30.0) -> bool:
    """Whether ``process`` listens on 127.0.0.1:port within ``timeout``; False as soon as it exits."""

    def up_or_gone() -> bool:
        if process.proc.poll() is not None:
            return True
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(up_or_gone, timeout, what=f"a listener on 127.0.0.1:{port}")
    except TimeoutError:
        return False
    return process.proc.poll() is None


def make_self_signed(directory: Path, name: str = SERVER_NAME) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def make_models(directory: Path) -> Path:
    mlapi("train-demo", "--models-dir", directory, check=True)
    return directory


def start_gunicorn(workdir: Path, models_dir: Path, port: int) -> Gunicorn:
    """The real service, one worker on 127.0.0.1:port, its output in workdir/gunicorn.log, answering /readyz."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"MLAPI_DEFAULT_MODEL": "iris", "MLAPI_MODELS_DIR": str(models_dir), "MLAPI_RATE_LIMIT_STORAGE_URI": "memory://"}
    server = Gunicorn(env, port=port, workers=1, log=workdir / "gunicorn.log")
    try:
        server.wait_ready(timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Edge:
    """A rendered NGINX configuration under ``prefix``, and the running NGINX when started."""

    prefix: Path
    http_port: int
    https_port: int
    upstream_ports: list[int]
    certificate: Path
    process: Process | None = None
    variables: dict = field(default_factory=dict)

    @property
    def access_log(self) -> Path:
        return self.prefix / "log" / "mlapi-access.log"

    def start(self) -> None:
        process = Process(["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-g", "daemon off;"],
                          log=self.prefix / "nginx.stdout")
        self.process = process
        if not _listening(process, self.http_port):
            error_log = self.prefix / "log" / "error.log"
            process.stop()
            raise AssertionError(f"nginx did not listen on 127.0.0.1:{self.http_port}:\n{process.output()}\n"
                                 f"{error_log.read_text() if error_log.exists() else ''}")

    def stop(self) -> None:
        if self.process is not None:
            # QUIT: graceful shutdown, the workers finish their requests.
            self.process.stop(sig=signal.SIGQUIT)

    def log_lines(self) -> list[str]:
        """Complete access log lines (a line being written has no newline yet)."""
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return text[: text.rfind("\n") + 1].splitlines()

    # Clients ----------------------------------------------------------------------------
    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))

    def https(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              source: str = "127.0.0.1", server_name: str = SERVER_NAME) -> Response:
        conn = _TLSConnection(self.https_port, server_name, self.tls_context(), source)
        return _exchange(conn, method, path, body, headers)

    def http(self, method: str, path: str, host: str = SERVER_NAME, source: str = "127.0.0.1") -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10, source_address=(source, 0))
        return _exchange(conn, method, path, None, {"Host": host})

    def predict(self, source: str = "127.0.0.1", headers: dict | None = None) -> Response:
        merged = {"Content-Type": "application/json", **(headers or {})}
        return self.https("POST", "/v1/predict", IRIS_BODY, merged, source=source)


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with the site's name in SNI, Host and certificate check (no DNS)."""

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext, source: str) -> None:
        super().__init__(server_name, port, context=context, timeout=10, source_address=(source, 0))

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout, self.source_address)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
              headers: dict | None) -> Response:
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        conn.close()


def render(prefix: Path, upstream_ports: list[int], with_certificate: bool = True, **overrides) -> Edge:
    """Render the nginx role's configuration into ``prefix`` (ports on 127.0.0.1, paths under prefix)."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "log").mkdir(exist_ok=True)
    if with_certificate:
        certificate, key = make_self_signed(prefix / "tls")
    else:
        certificate, key = prefix / "tls" / "fullchain.pem", prefix / "tls" / "privkey.pem"
    edge = Edge(prefix, plain_http_port(), free_port(), upstream_ports, certificate)
    variables = {
        "nginx_server_name": SERVER_NAME,
        "nginx_conf_dir": str(prefix),
        "nginx_log_dir": str(prefix / "log"),
        "nginx_pid_file": str(prefix / "nginx.pid"),
        "nginx_acme_webroot": str(prefix / "acme"),
        # The tests run as root in a private temporary folder the worker user could not read.
        "nginx_user": "root",
        "nginx_listen_addresses": ["127.0.0.1"],
        "nginx_http_port": edge.http_port,
        "nginx_https_port": edge.https_port,
        "nginx_ssl_certificate": str(certificate),
        "nginx_ssl_certificate_key": str(key),
        "nginx_upstream_servers": [f"127.0.0.1:{p}" for p in upstream_ports],
        # No gRPC location unless a test passes the service's gRPC ports.
        "nginx_grpc_upstream_servers": [],
        "nginx_manage_service": False,
        **overrides,
    }
    edge.variables = variables
    render_role("nginx", "config", variables)
    return edge


def running_edge(prefix: Path, upstream_ports: list[int], **overrides) -> Iterator[Edge]:
    """Render and start NGINX; the generator form suits a pytest fixture."""
    edge = render(prefix, upstream_ports, **overrides)
    edge.start()
    try:
        yield edge
    finally:
        edge.stop()
