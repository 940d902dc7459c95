"""The monitoring role on the shared provisioned sandbox host (issue 15): the real Prometheus that site.yml
installed scrapes every instance, node exporter and probe; every dashboard query gets series from the live
host; and the alerts fire for real: an instance stopped, a certificate near its expiry (the threshold
raised above what Pebble's certificate has left), a renewal whose HTTP-01 challenge is refused.

Prometheus listens on the host's loopback only, so the tests ask it there, over SSH. The sandbox inventory
sets short scrape, evaluation and for: durations (deploy/ansible/inventories/sandbox/group_vars/all.yml)
so each alert fires within a minute or two. Every test puts the host back as it found it: other modules
run after this one.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scripts.harness.deploy import app_host, https, require_provisioned, run_playbook, wait_until_every_instance_serves
from scripts.harness.samples import IRIS
from tests.monitoring import dashboard_queries

pytestmark = pytest.mark.e2e

PROMETHEUS = "http://127.0.0.1:9090"
ALERT_TIMEOUT = 240
MODELS_DIR = "/var/lib/mlapi/models"
REFUSED_VERSION = "monitoring-refused"
ACME_WEBROOT = "/var/www/acme"
DAY = 86400
RENEWAL_ATTEMPTS = 12


class Prometheus:
    """The HTTP API of the Prometheus on the monitoring host (the single sandbox host), asked over SSH."""

    def __init__(self, sandbox) -> None:
        self.sandbox = sandbox
        self.host = sandbox.host(sandbox.ip)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        args = " ".join(f"--data-urlencode {shlex.quote(f'{k}={v}')}" for k, v in params.items())
        result = self.sandbox.ssh(self.host, f"curl -sS --fail-with-body --get {args} {PROMETHEUS}{path}")
        assert result.returncode == 0, f"Prometheus {path} {params}: {result.stdout}{result.stderr}"
        answer = json.loads(result.stdout)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts(name) if a["state"] == "firing"]


def wait(condition: Callable[[], Any], timeout: float, what: str, pause: float = 3.0) -> Any:
    """Poll until `condition` returns something true; its last value names what was seen on failure."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"gave up after {timeout}s waiting for {what}; last seen: {value!r}")


def monitoring_run(sandbox, label: str, extra_vars: dict | None = None) -> None:
    run = run_playbook(sandbox, "site.yml", extra_vars, label=label, options=("--tags", "monitoring"))
    assert run.returncode == 0, f"site.yml --tags monitoring failed (log: {run.log}):\n{run.tail()}"


@pytest.fixture(scope="module")
def prometheus(sandbox) -> Prometheus:
    require_provisioned(sandbox)
    prom = Prometheus(sandbox)
    wait(lambda: prom.query("up"), 120, "Prometheus to have scraped its targets")
    return prom


@pytest.mark.parametrize(("job", "targets"), [("mlapi", 2), ("node", 1), ("mlapi-blackbox", 2)])
def test_prometheus_scrapes_every_target_of_the_job(prometheus, job, targets):
    def active() -> dict[str, str]:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == job}

    wait(lambda: active() and set(active().values()) == {"up"}, 90, f"every target of job {job} up")
    assert len(active()) == targets, active()
    # `up` of the targets scraped now (series of the package's default configuration, scraped
    # before the role replaced it, stay queryable for the 5-minute lookback).
    up = {s["metric"]["instance"]: s["value"][1] for s in prometheus.query(f'up{{job="{job}"}}')}
    assert {instance: up.get(instance) for instance in active()} == dict.fromkeys(active(), "1"), up


def test_the_instances_are_scraped_at_their_loopback_address(prometheus):
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    instances = {t["labels"]["instance"] for t in targets if t["labels"]["job"] == "mlapi"}
    assert instances == {"127.0.0.1:8001", "127.0.0.1:8002"}


@pytest.mark.parametrize("probe", ["healthz", "predict"])
def test_the_probe_of_the_public_endpoint_succeeds_over_tls(sandbox, prometheus, probe):
    instance = f"https://{sandbox.domain}/{'healthz' if probe == 'healthz' else 'v1/predict'}"
    selector = f'{{job="mlapi-blackbox", instance="{instance}"}}'
    success = wait(lambda: prometheus.query(f"probe_success{selector} == 1"), 60, f"probe_success 1 for {instance}")
    assert success
    tls = prometheus.query(f"probe_http_ssl{selector}")
    assert [s["value"][1] for s in tls] == ["1"], tls


def test_the_probe_reports_the_pebble_certificates_expiry(sandbox, prometheus):
    served = sandbox.ssh(sandbox.host(sandbox.ip),
                         f"openssl x509 -noout -enddate -in /etc/letsencrypt/live/{sandbox.domain}/cert.pem",
                         check=True).stdout
    not_after = sandbox.ssh(sandbox.host(sandbox.ip), f"date -d {shlex.quote(served.split('=', 1)[1].strip())} +%s",
                            check=True).stdout
    expiry = prometheus.query('min(probe_ssl_earliest_cert_expiry{job="mlapi-blackbox"})')
    assert expiry and float(expiry[0]["value"][1]) == float(not_after), (expiry, served)


# --- the dashboard --------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def dashboard_traffic(sandbox, prometheus) -> Iterator[None]:
    """Single and batch predictions (batches big enough for drift scores), a 422, requests over the
    service's own rate limit, and a refused model package (a copy of iris with a corrupt file, loaded by
    a reload of mlapi@1). Afterwards the package is removed, mlapi@1 restarted (which forgets the
    refusal) and the rate limit's window left to end."""
    host = app_host(sandbox)
    with https(sandbox) as client:
        for _ in range(5):
            assert client.post("/v1/predict", json=IRIS).status_code == 200
        for _ in range(10):
            batch = client.post("/v1/predict/batch", json={"instances": [IRIS["features"]] * 200})
            assert batch.status_code == 200, batch.text
        assert client.post("/v1/predict", json={"features": {"sepal_length": "x"}}).status_code == 422
    # Straight at one instance from the host, past NGINX's own limit: more than the 600 a minute of
    # MLAPI_RATE_LIMIT_DEFAULT from one client.
    urls = " ".join(["-o /dev/null http://127.0.0.1:8001/v1/models"] * 650)
    codes = sandbox.ssh(host, f"curl -s -w '%{{http_code}}\\n' {urls}", check=True).stdout.split()
    assert "429" in codes, f"no 429 in {len(codes)} requests: {sorted(set(codes))}"
    refused = f"{MODELS_DIR}/iris/{REFUSED_VERSION}"
    sandbox.ssh(host, f"cp -a {MODELS_DIR}/iris/1 {refused} && printf corrupt >> {refused}/model.joblib"
                      " && systemctl reload mlapi@1", check=True)
    try:
        yield
    finally:
        sandbox.ssh(host, f"rm -rf {refused} && systemctl restart mlapi@1", check=True)
        wait_until_every_instance_serves(sandbox, timeout=180)
        wait(lambda: not prometheus.query("mlapi_model_load_failures_total"), 120,
             "the refusal to be forgotten")
        wait(lambda: sandbox.ssh(host, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/v1/models")
             .stdout == "200", 90, "the rate limit's window to end")


class TestDashboard:
    """Each panel's query, against what the panels show made on the live host; its traffic fixture
    (class scope) puts the host back before the alert tests run."""

    @pytest.mark.parametrize("query", dashboard_queries())
    def test_query_returns_series_from_the_live_host(self, prometheus, dashboard_traffic, query):
        expr = dashboard_queries()[query]
        assert wait(lambda: prometheus.query(expr), 120, f"series for {expr}")


# --- alerts that fire -----------------------------------------------------------------------------------------


def test_stopping_an_instance_fires_instance_down(sandbox, prometheus):
    host = app_host(sandbox)
    assert not prometheus.firing("MlapiInstanceDown")
    sandbox.ssh(host, "systemctl stop mlapi@2", check=True)
    try:
        alerts = wait(lambda: prometheus.firing("MlapiInstanceDown"), ALERT_TIMEOUT, "MlapiInstanceDown to fire")
        assert [a["labels"]["instance"] for a in alerts] == ["127.0.0.1:8002"], alerts
    finally:
        sandbox.ssh(host, "systemctl start mlapi@2", check=True)
    wait(lambda: not prometheus.alerts("MlapiInstanceDown"), ALERT_TIMEOUT, "MlapiInstanceDown to clear")
    wait_until_every_instance_serves(sandbox, timeout=180)


def test_a_certificate_within_the_threshold_fires_expires_soon(sandbox, prometheus):
    expiry = prometheus.query('min(probe_ssl_earliest_cert_expiry{job="mlapi-blackbox"}) - time()')
    days_left = float(expiry[0]["value"][1]) / DAY
    assert not prometheus.firing("MlapiCertificateExpiresSoon")
    # The certificate is fresh: a threshold above the days it has left puts it within it.
    monitoring_run(sandbox, "monitoring-certificate-threshold",
                   {"monitoring_alert_certificate_days": int(days_left) + 10})
    try:
        alerts = wait(lambda: prometheus.firing("MlapiCertificateExpiresSoon"), ALERT_TIMEOUT,
                      "MlapiCertificateExpiresSoon to fire")
        assert {a["labels"]["instance"] for a in alerts} == {
            f"https://{sandbox.domain}/healthz", f"https://{sandbox.domain}/v1/predict"}, alerts
        assert f"within {int(days_left) + 10} days" in alerts[0]["annotations"]["description"]
    finally:
        monitoring_run(sandbox, "monitoring-certificate-threshold-restored")
    wait(lambda: not prometheus.alerts("MlapiCertificateExpiresSoon"), ALERT_TIMEOUT,
         "MlapiCertificateExpiresSoon to clear with the default threshold")


@pytest.fixture
def renewal_due(sandbox) -> Iterator[str]:
    """The certificate due for renewal (renew_before_expiry beyond its lifetime), put back afterwards."""
    host = sandbox.host(sandbox.ip)
    conf = f"/etc/letsencrypt/renewal/{sandbox.domain}.conf"
    sandbox.ssh(host, f"cp -a {conf} {conf}.monitoring-test && sed -i '/^renew_before_expiry/d' {conf}"
                      f" && sed -i '1i renew_before_expiry = 3650 days' {conf}", check=True)
    try:
        yield conf
    finally:
        sandbox.ssh(host, f"mv {conf}.monitoring-test {conf}", check=True)


def test_a_renewal_whose_challenge_is_refused_fires_renewal_failed(sandbox, prometheus, renewal_due):
    host = sandbox.host(sandbox.ip)
    assert not prometheus.firing("MlapiCertificateRenewalFailed")
    # NGINX's workers can no longer read the webroot: the ACME server gets 403 for the challenge.
    sandbox.ssh(host, f"chmod 0700 {ACME_WEBROOT}", check=True)
    try:
        # Pebble reuses a valid authorization half of the time (PEBBLE_AUTHZREUSE) and then asks for no
        # challenge: the certificate was validated minutes ago, so a renewal may still succeed. Each one
        # that does renews; the next asks again, until one needs the blocked challenge.
        for _ in range(RENEWAL_ATTEMPTS):
            if sandbox.ssh(host, "systemctl start certbot.service").returncode != 0:
                break
        else:
            raise AssertionError(f"certbot.service renewed {RENEWAL_ATTEMPTS} times with the challenge path blocked")
        state = sandbox.ssh(host, "systemctl is-failed certbot.service").stdout.strip()
        assert state == "failed", state
        alerts = wait(lambda: prometheus.firing("MlapiCertificateRenewalFailed"), ALERT_TIMEOUT,
                      "MlapiCertificateRenewalFailed to fire")
        assert [a["labels"]["name"] for a in alerts] == ["certbot.service"], alerts
    finally:
        sandbox.ssh(host, f"chmod 0755 {ACME_WEBROOT}", check=True)
    # The next run of the timer's service succeeds (and renews, the certificate being due): the alert clears.
    sandbox.ssh(host, "systemctl start certbot.service", check=True)
    wait(lambda: not prometheus.alerts("MlapiCertificateRenewalFailed"), ALERT_TIMEOUT,
         "MlapiCertificateRenewalFailed to clear after a renewal that succeeds")
    with https(sandbox) as client:
        assert client.post("/v1/predict", json=IRIS).status_code == 200
