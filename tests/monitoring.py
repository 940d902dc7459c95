"""The kit's monitoring files as tests read them: the alert rules as the monitoring role renders them, the
dashboard's queries, promtool, a real Prometheus on loopback, and the metric names the service exports."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from scripts.harness.roles import render_role
from scripts.harness.servers import Process, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
MONITORING_DIR = ROOT / "deploy" / "monitoring"
# Where the tests keep the rules rendered with the role's defaults (promtool test rules reads them there:
# tests/unit/alert_rules_test.yml).
ALERT_RULES = ROOT / ".cache" / "monitoring" / "alerts.yml"
DASHBOARD = MONITORING_DIR / "grafana-dashboard.json"
# What Grafana puts in place of its interval macros before it sends a query; a dashboard variable becomes
# its "All" value.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

_MLAPI_METRIC = re.compile(r"\bmlapi_[a-z_]+\b")


def promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """promtool from the distribution's prometheus package (scripts/setup-host.sh installs it)."""
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run scripts/setup-host.sh (Debian package prometheus)"
    return subprocess.run([binary, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def render_alert_rules(destination: Path, **variables: Any) -> Path:
    """deploy/monitoring/alerts.yml.j2 rendered by the monitoring role (tasks_from: rules, with its defaults
    and argument checks, and promtool check rules as the role validates it) into `destination`, with
    `variables` over the defaults."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    render_role("monitoring", "rules", {"monitoring_rules_file": str(destination), **variables})
    return destination


@functools.cache
def default_alert_rules() -> Path:
    """The rules as a host gets them from the role's defaults, rendered once per test session."""
    return render_alert_rules(ALERT_RULES)


def alert_rules(path: Path | None = None) -> list[dict[str, Any]]:
    """Every alerting rule of the rendered rules file `path` (the role's defaults when not given)."""
    groups = yaml.safe_load((path or default_alert_rules()).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> dict[str, str]:
    """Every panel target's PromQL as Grafana sends it with every variable on All, by "panel title/refId"."""
    board = dashboard()
    values = {**GRAFANA_MACROS, **{f"${var['name']}": var["allValue"] for var in board["templating"]["list"]}}
    queries = {}
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            queries[f"{panel['title']}/{target['refId']}"] = expr
    return queries


def mlapi_metrics_in(expression: str) -> set[str]:
    return set(_MLAPI_METRIC.findall(expression))


def exported_metric_names() -> set[str]:
    """The sample names app/metrics.py exports, as Prometheus stores them (counters with _total,
    histograms with _bucket, _sum and _count)."""
    from prometheus_client.metrics import MetricWrapperBase

    from app import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {
        obj._name + suffix
        for obj in vars(metrics).values()
        if isinstance(obj, MetricWrapperBase)
        for suffix in suffixes[obj._type]
    }
    with tempfile.TemporaryDirectory() as folder:  # the folder's own gauges exist only at render time
        names |= {family.name for family in metrics.FolderHealth(Path(folder)).collect()}
    return names


class Prometheus(Process):
    """The distribution's prometheus on a loopback port, storing in a temporary folder, scraping `targets`
    as job mlapi every second."""

    def __init__(self, targets: list[str]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mlapi-prometheus-"))
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(default_alert_rules())],
            "scrape_configs": [{"job_name": "mlapi", "static_configs": [{"targets": targets}]}],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: run scripts/setup-host.sh (Debian package prometheus)"
        super().__init__([
            binary, f"--config.file={self.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], cwd=self.workdir)
        self.url = f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> dict[str, Any]:
        """The answer of /api/v1/query to `expr`, evaluated now."""
        return httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def prometheus(targets: list[str]) -> Iterator[Prometheus]:
    server = Prometheus(targets)
    try:
        wait_for(lambda: httpx.get(server.url + "/-/ready", timeout=2).status_code == 200, 60,
                 what=f"prometheus ready on {server.url}")
        yield server
    finally:
        server.stop()
