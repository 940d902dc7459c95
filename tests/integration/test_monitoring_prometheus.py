"""A real Prometheus scraping a real gunicorn: it loads the kit's alert rules, and every dashboard panel that
reads the service's own metrics gets series.

The service runs as deployed, with a shared Redis store, and sees what the panels show: predictions (batches
large enough for drift scores), client errors, requests over a rate limit, and a refused model package (a
second iris version with a corrupt file). Panels of the blackbox and node exporters are left out: no exporter
runs here (their queries are parsed by tests/unit/test_grafana_dashboard.py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import gunicorn, redis_server, wait_for
from tests.monitoring import Prometheus, alert_rules, dashboard_queries, prometheus

pytestmark = pytest.mark.integration

EXPORTER_METRIC = re.compile(r"\b(probe|node)_")
QUERIES = {name: expr for name, expr in dashboard_queries().items() if not EXPORTER_METRIC.search(expr)}
BATCH_ROWS = 200  # a worker refreshes its drift scores every 200 rows
BATCHES = 4
RATE_LIMIT = "3/minute"
MODEL_LISTINGS = 5


@pytest.fixture(scope="module")
def scraped(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    models = tmp_path_factory.mktemp("monitoring") / "models"
    shutil.copytree(demo_models, models)
    shutil.copytree(models / "iris" / "1", models / "iris" / "2")
    with open(models / "iris" / "2" / "model.joblib", "ab") as f:
        f.write(b"corrupt")  # fails its sha256: refused, version 1 serves
    with (
        redis_server() as store_url,
        gunicorn(
            {
                "MLAPI_MODELS_DIR": str(models),
                "MLAPI_DEFAULT_MODEL": "iris",
                "MLAPI_RATE_LIMIT_STORAGE_URI": store_url,
                "MLAPI_RATE_LIMIT_DEFAULT": RATE_LIMIT,
            }
        ) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        for _ in range(BATCHES):
            assert client.post("/v1/predict/batch", json={"instances": [IRIS_ROW] * BATCH_ROWS}).status_code == 200
        assert client.post("/v1/predict", json={"features": {"sepal_length": "x"}}).status_code == 422
        listings = [client.get("/v1/models").status_code for _ in range(MODEL_LISTINGS)]
        assert 429 in listings
        with prometheus([f"127.0.0.1:{server.port}"]) as prom:
            # rate() and increase() need two samples in their window.
            wait_for(
                lambda: prom.query('count_over_time(up{job="mlapi"}[1m]) >= 3')["data"]["result"],
                60,
                what="three scrapes of the instance",
            )
            yield prom


def test_prometheus_loads_every_alert_rule(scraped: Prometheus):
    groups = httpx.get(scraped.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in alert_rules()}


@pytest.mark.parametrize("query", QUERIES)
def test_panel_query_returns_series(scraped: Prometheus, query: str):
    answer = scraped.query(QUERIES[query])
    assert answer["status"] == "success" and answer["data"]["result"], f"{QUERIES[query]}: {answer}"
