"""The NGINX edge as the nginx role renders it, in front of two real gunicorn instances.

Each test that sends API requests uses its own loopback source address, so that it has its
own rate-limit bucket and the tests do not depend on each other's traffic.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import socket
import ssl
import subprocess

import pytest

from app.api.docs import REDOC_CSP, SWAGGER_UI_CSP
from app.errors import ErrorShape, route_shape
from app.main import create_app
from app.server.middleware import STRICT_CSP_HEADER
from app.settings import Settings
from scripts.harness.nginx import ERROR_FIELDS, SERVER_NAME, Response, make_models, running_edge, start_gunicorn
from scripts.harness.servers import VENV_BIN, free_port, wait_for

pytestmark = pytest.mark.integration

RATE_LIMIT_RPS = 1
RATE_LIMIT_BURST = 5
METRICS_CLIENT = "127.0.0.3"  # the only address allowed to read /metrics here (not 127.0.0.1)
LOG_FIELDS = {
    "time", "request_id", "client_request_id", "remote_addr", "method", "uri", "protocol", "status", "body_bytes_sent",
    "request_time", "upstream_addr", "upstream_status", "upstream_response_time", "ssl_protocol",
    "ssl_cipher", "http_user_agent", "host",
}
STRICT_CSP = STRICT_CSP_HEADER[1].decode()
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_sources = (f"127.0.1.{n}" for n in itertools.count(1))


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    models = make_models(root / "models")
    ports = [free_port(), free_port()]
    instances = [start_gunicorn(root / f"gunicorn-{i}", models, port) for i, port in enumerate(ports)]
    try:
        yield from running_edge(
            root / "nginx", ports,
            nginx_rate_limit_rps=RATE_LIMIT_RPS,
            nginx_rate_limit_burst=RATE_LIMIT_BURST,
            nginx_metrics_allow=[METRICS_CLIENT],
        )
    finally:
        for instance in instances:
            instance.stop()


@pytest.fixture
def source():
    """A loopback address of this test's own: its own rate-limit bucket."""
    return next(_sources)


def rate_limited_response(edge, source):
    """Predictions from one address until the edge refuses one (bounded)."""
    for _ in range(RATE_LIMIT_BURST + 40):
        response = edge.predict(source=source)
        if response.status != 200:
            return response
    raise AssertionError(f"no refusal after {RATE_LIMIT_BURST + 40} requests at {RATE_LIMIT_RPS} r/s")


def log_entries(edge, value, field="request_id", count=1):
    """The access log lines whose ``field`` is ``value``, once there are ``count`` of them. NGINX writes a
    line after the response (for a refused body, after the client has gone), so they are polled for, a
    bounded number of times."""
    matches = []

    def logged():
        matches[:] = [e for e in map(json.loads, edge.log_lines()) if e[field] == value]
        return len(matches) >= count

    wait_for(logged, 30, what=f"{count} access log line(s) with {field} {value}")
    return matches


def log_entry(edge, value, field="request_id"):
    return log_entries(edge, value, field)[-1]


def service_log_entries(edge, client_request_id):
    """The services' access log lines for one client request id (each instance writes its own log)."""
    entries = []
    for log in sorted(edge.prefix.parent.glob("gunicorn-*/gunicorn.log")):
        for line in log.read_text().splitlines():
            if f'"{client_request_id}"' in line:
                entry = json.loads(line)
                if entry.get("logger") == "mlapi.access" and entry.get("client_request_id") == client_request_id:
                    entries.append(entry)
    return entries


# Port 80 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/v1/predict?model=iris", "/.well-known/other"])
def test_http_redirects_to_https_with_308(edge, path):
    response = edge.http("GET", path)
    assert response.status == 308
    assert response.headers["Location"] == f"https://{SERVER_NAME}:{edge.https_port}{path}"


def test_acme_challenge_is_served_from_the_webroot_over_http(edge):
    challenges = edge.prefix / "acme" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True, exist_ok=True)
    (challenges / "token-123").write_text("token-123.thumbprint")
    response = edge.http("GET", "/.well-known/acme-challenge/token-123")
    assert (response.status, response.body) == (200, b"token-123.thumbprint")


# TLS --------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_old_tls_versions_are_refused_by_the_server(edge, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(edge.certificate))
    # Let the client offer the old version at all (OpenSSL 3 forbids it at the default level),
    # so that a refusal can only come from the server.
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10) as sock, \
            pytest.raises(ssl.SSLError) as refused:
        context.wrap_socket(sock, server_hostname=SERVER_NAME)
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_current_tls_versions_are_accepted(edge, version):
    context = edge.tls_context()
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
        assert tls.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def test_http2_is_offered(edge):
    context = edge.tls_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
        assert tls.selected_alpn_protocol() == "h2"


# Unknown names ----------------------------------------------------------------------------

def test_unknown_host_on_http_gets_no_answer(edge):
    # 444: NGINX closes the connection without a response.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        edge.http("GET", "/", host="other.example")


@pytest.mark.parametrize("server_name", ["other.example", None], ids=["other-name", "no-sni"])
def test_unknown_name_on_https_fails_the_handshake(edge, server_name):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # No verification: a refusal must come from the server, not from a certificate check.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10) as sock, \
            pytest.raises(ssl.SSLError) as refused:
        context.wrap_socket(sock, server_hostname=server_name)
    assert "UNRECOGNIZED_NAME" in str(refused.value)


# Headers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/no-such-route", "/docs", "/redoc"])
def test_security_headers_on_service_responses(edge, source, path):
    response = edge.https("GET", path, source=source)
    assert response.status in (200, 404)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get_all(name) == [value], name
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Server"] == "nginx"


# Only the two pages may load anything; their assets and every other answer allow nothing.
POLICY_BY_PATH = {
    "/docs": SWAGGER_UI_CSP,
    "/redoc": REDOC_CSP,
    "/docs/static/docs.js": STRICT_CSP,
    "/docs/": STRICT_CSP,
    "/healthz": STRICT_CSP,
    "/openapi.json": STRICT_CSP,
    "/no-such-route": STRICT_CSP,
}


@pytest.mark.parametrize("path", POLICY_BY_PATH)
def test_content_security_policy_is_the_services_own_for_each_path(edge, source, path):
    response = edge.https("GET", path, source=source)
    assert response.headers.get_all("Content-Security-Policy") == [POLICY_BY_PATH[path]]


@pytest.mark.parametrize("status", [404, 413, 429])
def test_hsts_on_error_responses(edge, source, status):
    if status == 404:
        response = edge.https("GET", "/no-such-route", source=source)
    elif status == 413:
        response = oversized_request(edge, source)
    else:
        response = rate_limited_response(edge, source)
    assert response.status == status
    assert response.headers.get_all("Strict-Transport-Security") == ["max-age=63072000"]


# Request IDs ------------------------------------------------------------------------------

def test_request_id_is_generated_and_forwarded(edge, source):
    response = edge.predict(source=source)
    assert response.status == 200
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # The service answered with the ID NGINX forwarded to it.
    assert response.json()["request_id"] == generated
    assert log_entry(edge, generated)["upstream_status"] == "200"


def test_client_request_id_is_kept_beside_the_edge_id(edge, source):
    response = edge.predict(source=source, headers={"X-Request-ID": "client-id.42"})
    edge_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", edge_id)
    assert response.headers.get_all("X-Client-Request-ID") == ["client-id.42"]
    assert response.json()["request_id"] == edge_id
    assert log_entry(edge, edge_id)["client_request_id"] == "client-id.42"


def test_two_clients_sending_the_same_request_id_never_share_a_log_key(edge, source):
    ids = {edge.predict(source=source, headers={"X-Request-ID": "same-id.7"}).headers["X-Request-ID"]
           for _ in range(2)}
    assert len(ids) == 2
    edge_logged = {e["request_id"] for e in log_entries(edge, "same-id.7", "client_request_id", count=2)}
    service_logged: set = set()

    def in_service_logs() -> bool:
        service_logged.update(e["request_id"] for e in service_log_entries(edge, "same-id.7"))
        return len(service_logged) >= 2

    wait_for(in_service_logs, 30, what="both requests in the services' access logs")
    assert edge_logged == service_logged == ids


@pytest.mark.parametrize(
    "headers", [{"X-Request-ID": 'bad"id'}, {"X-Client-Request-ID": "forged"}], ids=["unsafe", "client-sent-header"]
)
def test_no_client_request_id_is_kept_unless_a_plain_one_was_sent(edge, source, headers):
    response = edge.predict(source=source, headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert response.json()["request_id"] == response.headers["X-Request-ID"]
    assert "X-Client-Request-ID" not in response.headers
    assert log_entry(edge, response.headers["X-Request-ID"])["client_request_id"] == ""


# Limits -----------------------------------------------------------------------------------

def test_burst_over_the_limit_gets_429_in_the_error_shape(edge, source):
    statuses = [edge.predict(source=source) for _ in range(RATE_LIMIT_BURST + 30)]
    assert {r.status for r in statuses} <= {200, 429}, "only successes and 429s, never 503"
    refused = [r for r in statuses if r.status == 429]
    assert refused, "a burst over the limit must be refused"
    body = refused[0].json()
    assert set(body["error"]) == ERROR_FIELDS
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"] == refused[0].headers["X-Request-ID"]
    assert refused[0].headers["Content-Type"] == "application/json"
    assert refused[0].headers["Retry-After"] == "1"


PROTOCOL_REQUESTS = {
    "v2-infer": ("POST", "/v2/models/iris/infer",
                 {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}),
    "v2-metadata": ("GET", "/v2/models/iris", None),
    "kserve-v1": ("POST", "/v1/models/iris:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}),
}


@pytest.mark.parametrize("case", list(PROTOCOL_REQUESTS))
def test_protocol_routes_are_rate_limited_with_their_error_shape(edge, source, case):
    method, path, body = PROTOCOL_REQUESTS[case]
    payload = json.dumps(body).encode() if body is not None else None
    statuses = [edge.https(method, path, payload, {"Content-Type": "application/json"}, source=source)
                for _ in range(RATE_LIMIT_BURST + 30)]
    assert {r.status for r in statuses} <= {200, 429}
    refused = [r for r in statuses if r.status == 429]
    assert refused, f"a burst over the limit on {path} must be refused"
    assert set(refused[0].json()) == {"error"} and "Retry-After" in refused[0].json()["error"]
    assert refused[0].headers["Retry-After"] == "1"
    assert refused[0].headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_routes_are_not_rate_limited(edge, source, path):
    statuses = {edge.https("GET", path, source=source).status for _ in range(RATE_LIMIT_BURST + 20)}
    assert statuses == {200}


def oversized_request(edge, source, request_id=None, path="/v1/predict"):
    """Announce a body one byte over 4 MiB; NGINX must answer before reading it."""
    conn = http.client.HTTPSConnection(SERVER_NAME, edge.https_port, context=edge.tls_context(), timeout=10)
    sock = socket.create_connection(("127.0.0.1", edge.https_port), 10, (source, 0))
    conn.sock = conn._context.wrap_socket(sock, server_hostname=SERVER_NAME)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(4 * 1024 * 1024 + 1))
    if request_id:
        conn.putheader("X-Request-ID", request_id)
    conn.endheaders()
    response = conn.getresponse()
    result = Response(response.status, response.headers, response.read())
    conn.close()
    return result


def test_body_over_the_limit_gets_413_json_without_reaching_the_service(edge, source):
    response = oversized_request(edge, source, request_id="too-large-1")
    assert response.status == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.json()["error"]["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["X-Client-Request-ID"] == "too-large-1"
    assert log_entry(edge, "too-large-1", "client_request_id")["upstream_addr"] in ("", "-")


def app_routes(models) -> list[tuple[str, ErrorShape]]:
    """Every route of the app the edge's instances run, as a path with sample parameters, and its error shape."""
    app = create_app(Settings(models_dir=models, default_model="iris"))
    routes = app.state.error_shapes.routes
    return [(route.path.format(name="iris", version="1"), route_shape(route)) for route in routes]


def test_nginx_answers_each_route_of_the_app_in_that_routes_error_shape(edge, source):
    """The site's locations copy the API's URL patterns into regexes. Route by route of the app itself (every
    model, version and protocol route), an error NGINX makes on its own takes the shape that route's router
    chose: a route the app adds or moves without its location shows up here."""
    routes = app_routes(edge.prefix.parent / "models")
    assert {shape for _, shape in routes} == set(ErrorShape)
    wrong = {}
    for path, shape in routes:
        error = oversized_request(edge, source, path=path).json()["error"]
        seen = ErrorShape.PROTOCOL if isinstance(error, str) else ErrorShape.SERVICE
        if seen is not shape:
            wrong[path] = f"{seen.value}, the route's is {shape.value}"
    assert not wrong, f"NGINX's 413 is not in the route's error shape (deploy/nginx/sites-available): {wrong}"


def test_metrics_are_forbidden_to_other_addresses(edge):
    # 127.0.0.1 is not in this edge's allow list.
    response = edge.https("GET", "/metrics", source="127.0.0.1")
    assert response.status == 403
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "forbidden"


def test_metrics_are_served_to_an_allowed_address(edge):
    response = edge.https("GET", "/metrics", source=METRICS_CLIENT)
    assert response.status == 200
    assert b"# TYPE" in response.body


# Access log -------------------------------------------------------------------------------

def test_every_access_log_line_is_json_with_the_required_fields(edge, source):
    edge.http("GET", "/")
    edge.predict(source=source, headers={"X-Request-ID": "logged-1"})
    entry = log_entry(edge, "logged-1", "client_request_id")
    for line in edge.log_lines():
        fields = set(json.loads(line))
        assert fields >= LOG_FIELDS, f"missing {LOG_FIELDS - fields} in {line}"
    assert (entry["method"], entry["uri"], entry["status"]) == ("POST", "/v1/predict", 200)
    assert entry["ssl_protocol"] == "TLSv1.3"
    assert entry["host"] == SERVER_NAME


# Linters ----------------------------------------------------------------------------------

def test_lint_nginx_t_accepts_the_rendered_configuration(edge):
    result = subprocess.run(["nginx", "-t", "-c", str(edge.prefix / "nginx.conf")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_lint_gixy_accepts_the_rendered_configuration(edge):
    result = subprocess.run([str(VENV_BIN / "gixy"), str(edge.prefix / "nginx.conf")], capture_output=True, text=True)
    assert result.returncode == 0, f"gixy reports issues; change the templates in deploy/nginx/:\n{result.stdout}"
    assert "No issues found" in result.stdout
