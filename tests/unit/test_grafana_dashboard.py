"""deploy/monitoring/grafana-dashboard.json imports as is and every panel's query is valid PromQL.

promtool parses no bare expression; each query becomes the one recording rule of a rules file, which
`promtool check rules` parses as Prometheus would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.monitoring import dashboard, dashboard_queries, exported_metric_names, mlapi_metrics_in, promtool

BOARD = dashboard()
PANELS = {panel["title"]: panel for panel in BOARD["panels"]}
QUERIES = dashboard_queries()
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_dashboard_asks_for_its_prometheus_on_import():
    assert [(i["name"], i["type"], i["pluginId"]) for i in BOARD["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]


def test_dashboard_has_no_id_of_another_grafana():
    assert BOARD["id"] is None


@pytest.mark.parametrize("title", PANELS)
def test_panel_reads_the_imported_datasource(title: str):
    panel = PANELS[title]
    assert [panel["datasource"], *(t["datasource"] for t in panel["targets"])] == [DATASOURCE] * (
        1 + len(panel["targets"])
    )


@pytest.mark.parametrize("title", PANELS)
def test_panel_has_a_query(title: str):
    assert PANELS[title]["targets"] and all(t["expr"].strip() for t in PANELS[title]["targets"])


@pytest.mark.parametrize("query", QUERIES)
def test_panel_query_parses(query: str, tmp_path: Path):
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": "dashboard:query", "expr": QUERIES[query]}]}]}
    (tmp_path / "query.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", tmp_path / "query.yml")
    assert result.returncode == 0, f"{QUERIES[query]}\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("query", QUERIES)
def test_panel_query_reads_metrics_the_service_exports(query: str):
    unknown = mlapi_metrics_in(QUERIES[query]) - exported_metric_names()
    assert not unknown, f"{query} reads metrics app/metrics.py does not export: {sorted(unknown)}"
