"""The API's own OpenAPI schema, fuzzed through the NGINX edge, and hand-made hostile bodies.

schemathesis generates requests from the schema the live service publishes (valid ones and
deliberately invalid ones) and sends them over HTTPS to the local NGINX, which proxies them
to real gunicorn. Every response must be a documented status with the documented content
type and body, and never a 5xx. Rate limits are off in the service and raised at the edge so
that they cannot answer instead of the code under test.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from scripts.harness.nginx import ERROR_FIELDS, SERVER_NAME, Response
from scripts.harness.servers import wait_for

from edge_service import service_behind_edge

pytestmark = pytest.mark.integration

MIN_GENERATED_REQUESTS = 1000
# Per operation and generation mode; operations whose inputs allow fewer distinct
# requests (GET /healthz) end early, the others make up the total.
MAX_EXAMPLES = 32
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# What each kind of generated request may get back. Invalid input: a 4xx from the documented
# list (413 for a batch over the limit); never a 5xx, unlike schemathesis's default. Valid
# input: 200, or 404 when a generated model name or version does not exist.
FUZZ_CONFIG = schemathesis.Config.from_dict({
    "checks": {
        "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 413, 415, 422, 429]},
        "positive_data_acceptance": {"expected-statuses": [200, 404]},
    },
})
EDGE_LIMITS = {"nginx_rate_limit_rps": 100000, "nginx_rate_limit_burst": 100000, "nginx_limit_conn": 10000}
MAX_BODY_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def edge(tmp_path_factory, demo_models):
    with service_behind_edge(
        tmp_path_factory.mktemp("fuzz-edge"), demo_models,
        service_env={"MLAPI_RATE_LIMIT_ENABLED": "false"}, **EDGE_LIMITS,
    ) as (edge, _server):
        yield edge


class _SiteAdapter(HTTPAdapter):
    """HTTPS to 127.0.0.1 with the site's name in SNI and in the certificate check (no DNS)."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs.update(server_hostname=SERVER_NAME, assert_hostname=SERVER_NAME)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def session(edge):
    with requests.Session() as s:
        # Loopback only: no proxy, no CA bundle from the environment (it would replace `verify`).
        s.trust_env = False
        s.mount("https://", _SiteAdapter())
        s.verify = str(edge.certificate)
        s.headers["Host"] = SERVER_NAME
        yield s


@pytest.fixture(scope="module")
def base_url(edge):
    return f"https://127.0.0.1:{edge.https_port}"


@pytest.fixture(scope="module")
def schema(session, base_url):
    response = session.get(base_url + "/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    return schemathesis.openapi.from_dict(response.json(), config=FUZZ_CONFIG)


def _fuzz(operation, mode: GenerationMode, session, base_url: str, certificate: str) -> tuple[int, str | None]:
    """Requests sent for one operation in one generation mode, and the first failure (shrunk)."""
    sent = 0
    checks = [*CHECKS, negative_data_rejection if mode == GenerationMode.NEGATIVE else positive_data_acceptance]

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        nonlocal sent
        response = case.call(base_url=base_url, session=session, verify=certificate, timeout=30)
        sent += 1
        case.validate_response(response, checks=checks)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode == GenerationMode.NEGATIVE and sent == 0
    except (Exception, BaseExceptionGroup) as exc:  # reported with the other operations' results
        return sent, str(exc)[:3000]
    return sent, None


def test_generated_requests_through_nginx_conform_to_the_schema(edge, schema, session, base_url):
    sent: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"
            sent[label], failure = _fuzz(operation, mode, session, base_url, str(edge.certificate))
            if failure:
                failures[label] = failure
    total = sum(sent.values())
    report = "\n".join(f"{count:5d} {label}" for label, count in sorted(sent.items()))
    print(f"generated requests through NGINX: {total}\n{report}")
    assert not failures, "responses that break the published schema (fix the service in app/):\n\n" + "\n\n".join(
        f"== {label}\n{message}" for label, message in failures.items()
    )
    assert total >= MIN_GENERATED_REQUESTS, f"only {total} generated requests; raise MAX_EXAMPLES\n{report}"
    # They went through NGINX: each has its line in the edge's access log.
    assert len(edge.log_lines()) >= total


# Hostile bodies, by hand ------------------------------------------------------------------

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def _predict_body(value: str) -> bytes:
    """A /v1/predict body whose first feature is the raw JSON text `value`."""
    others = ", ".join(f'"{name}": 1.0' for name in FEATURES[1:])
    return f'{{"features": {{"{FEATURES[0]}": {value}, {others}}}}}'.encode()


def _infer_body(value: str) -> bytes:
    """A /v2 infer body whose first value is the raw JSON text `value`."""
    tensor = f'{{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [{value}, 1.0, 1.0, 1.0]}}'
    return f'{{"inputs": [{tensor}]}}'.encode()


# Values that are valid JSON text (for Python's parser at least) but not a feature value.
HOSTILE_VALUES = {
    "float-beyond-the-magnitude-limit": "1e308",
    "float-overflowing-to-infinity": "1e400",
    "integer-of-400-digits": "1" + "0" * 400,
    "nan-literal": "NaN",
    "infinity-literal": "Infinity",
    "negative-infinity-literal": "-Infinity",
    "deeply-nested-value": "[" * 10000 + "]" * 10000,
    "string": '"5.1"',
    "boolean": "true",
}
# Bodies that are not a request at all: (body, Content-Type); None as body means a valid one.
HOSTILE_BODIES = {
    "malformed-json": (b'{"features": {"sepal_length": 5.1,', "application/json"),
    "deeply-nested-array": (b"[" * 10000 + b"]" * 10000, "application/json"),
    "deeply-nested-object": (b'{"a":' * 10000 + b"1" + b"}" * 10000, "application/json"),
    "text-plain": (None, "text/plain"),
    "form-encoded": (b"sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2",
                     "application/x-www-form-urlencoded"),
    "no-content-type": (None, None),
    "empty-body": (b"", "application/json"),
    "json-null": (b"null", "application/json"),
    "json-string": (b'"features"', "application/json"),
    "invalid-utf8": (b'{"features": "\xff\xfe"}', "application/json"),
}
V1_PATH, V2_PATH = "/v1/predict", "/v2/models/iris/infer"
ERROR_STATUSES = {400, 413, 415, 422}


def _send(edge, path: str, body: bytes, content_type: str | None, request_id: str | None = None) -> Response:
    headers = {"Content-Type": content_type} if content_type else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    return edge.https("POST", path, body, headers)


def _assert_v1_error(response: Response, statuses: set[int]) -> dict:
    assert response.status in statuses, (response.status, response.body[:500])
    assert response.headers["Content-Type"] == "application/json", response.headers["Content-Type"]
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS, error
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def _assert_v2_error(response: Response, statuses: set[int]) -> str:
    assert response.status in statuses, (response.status, response.body[:500])
    assert response.headers["Content-Type"] == "application/json", response.headers["Content-Type"]
    error = response.json()["error"]
    assert isinstance(error, str) and error, response.body[:500]
    return error


@pytest.mark.parametrize("case", HOSTILE_VALUES)
def test_hostile_value_gets_a_4xx_in_the_error_shape_on_v1(edge, case):
    response = _send(edge, V1_PATH, _predict_body(HOSTILE_VALUES[case]), "application/json")
    # Nesting too deep for the JSON parser is refused as unparseable (400), before any field is read.
    error = _assert_v1_error(response, {400} if case.startswith("deeply-nested") else {422})
    if response.status == 422:
        assert error["details"] and error["details"][0]["loc"][-1] == FEATURES[0], error


@pytest.mark.parametrize("case", HOSTILE_VALUES)
def test_hostile_value_gets_a_4xx_in_the_error_shape_on_v2(edge, case):
    _assert_v2_error(_send(edge, V2_PATH, _infer_body(HOSTILE_VALUES[case]), "application/json"), {400, 422})


@pytest.mark.parametrize("case", HOSTILE_BODIES)
def test_hostile_body_gets_a_4xx_in_the_error_shape_on_v1(edge, case):
    body, content_type = HOSTILE_BODIES[case]
    body = _predict_body("5.1") if body is None else body
    _assert_v1_error(_send(edge, V1_PATH, body, content_type), ERROR_STATUSES)


# The Open Inference Protocol reads a valid body whatever its Content-Type (tritonclient sends none).
V2_READS_ANY_CONTENT_TYPE = {"text-plain", "no-content-type"}


@pytest.mark.parametrize("case", sorted(set(HOSTILE_BODIES) - V2_READS_ANY_CONTENT_TYPE))
def test_hostile_body_gets_a_4xx_in_the_error_shape_on_v2(edge, case):
    body, content_type = HOSTILE_BODIES[case]
    _assert_v2_error(_send(edge, V2_PATH, body, content_type), ERROR_STATUSES)


@pytest.mark.parametrize("case", sorted(V2_READS_ANY_CONTENT_TYPE))
def test_a_valid_body_is_served_on_v2_whatever_its_content_type(edge, case):
    _body, content_type = HOSTILE_BODIES[case]
    response = _send(edge, V2_PATH, _infer_body("5.1"), content_type)
    assert response.status == 200, response.body[:500]
    assert response.json()["outputs"][0]["name"] == "predict"


def test_body_over_the_size_limit_gets_413_from_the_edge(edge):
    body = b'{"instances": [' + b"[1.0, 1.0, 1.0, 1.0], " * (MAX_BODY_BYTES // 22) + b"[1.0, 1.0, 1.0, 1.0]]}"
    assert len(body) > MAX_BODY_BYTES
    response = _send(edge, "/v1/predict/batch", body, "application/json", request_id="over-size-1")
    assert _assert_v1_error(response, {413})["code"] == "payload_too_large"
    entries: list[dict] = []

    def logged() -> bool:
        entries[:] = [e for e in map(json.loads, edge.log_lines()) if e["client_request_id"] == "over-size-1"]
        return bool(entries)

    wait_for(logged, 30, what="the edge's access log line of the oversized request")
    assert entries[0]["upstream_addr"] in ("", "-"), "NGINX must refuse it itself, without asking the service"


def test_batch_over_the_instance_limit_gets_413(edge):
    body = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]] * 1001}).encode()
    error = _assert_v1_error(_send(edge, "/v1/predict/batch", body, "application/json"), {413})
    assert "1000" in error["message"]
