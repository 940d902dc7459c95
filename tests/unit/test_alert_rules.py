"""deploy/monitoring/alerts.yml.j2 as the monitoring role renders it with its defaults: valid for Prometheus,
and each alert fires on its trouble and only then.

The cases are the test groups of alert_rules_test.yml, a promtool test file; each runs as its own test so
a failure names the alert and the case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.monitoring import (
    ROOT,
    alert_rules,
    default_alert_rules,
    exported_metric_names,
    mlapi_metrics_in,
    promtool,
    render_alert_rules,
)

CASES_FILE = Path(__file__).with_name("alert_rules_test.yml")
# Every scalar as text: PyYAML would read values such as 0x10 ("0, ten times") as hexadecimal.
CASES = yaml.load(CASES_FILE.read_text(), Loader=yaml.BaseLoader)
GROUPS = {group["name"]: group for group in CASES["tests"]}
ALERTS = {rule["alert"]: rule for rule in alert_rules()}
RUNBOOK = ROOT / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning"}


def _cases(alert: str, firing: bool) -> list[str]:
    return [
        name for name, group in GROUPS.items()
        for case in group["alert_rule_test"]
        if case["alertname"] == alert and bool(case.get("exp_alerts")) is firing
    ]


def _runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", default_alert_rules())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", GROUPS)
def test_alert_case(name: str, tmp_path: Path):
    cases = {
        "rule_files": [str(default_alert_rules())],
        "evaluation_interval": CASES["evaluation_interval"],
        "tests": [GROUPS[name]],
    }
    (tmp_path / "case.yml").write_text(yaml.safe_dump(cases, sort_keys=False))
    result = promtool("test", "rules", "case.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_a_case_where_it_fires(alert: str):
    assert _cases(alert, firing=True), f"add a test group to {CASES_FILE.name} where {alert} fires"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_a_case_where_it_stays_silent(alert: str):
    assert _cases(alert, firing=False), f"add a test group to {CASES_FILE.name} where {alert} stays silent"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_waits_before_firing(alert: str):
    assert ALERTS[alert].get("for"), f"{alert}: give it a for: so one bad scrape does not page"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_a_severity(alert: str):
    assert ALERTS[alert].get("labels", {}).get("severity") in SEVERITIES


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_says_what_to_do(alert: str):
    annotations = ALERTS[alert].get("annotations", {})
    assert annotations.get("summary") and annotations.get("description")


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_links_its_runbook_section(alert: str):
    page, _, anchor = ALERTS[alert]["annotations"]["runbook_url"].partition("#")
    assert page == "docs/runbook.md" and anchor in _runbook_anchors(), f"{alert}: no section #{anchor} in {page}"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_reads_metrics_the_service_exports(alert: str):
    unknown = mlapi_metrics_in(ALERTS[alert]["expr"]) - exported_metric_names()
    assert not unknown, f"{alert} reads metrics app/metrics.py does not export: {sorted(unknown)}"


def test_the_certificate_threshold_is_the_roles_variable(tmp_path: Path):
    rules = render_alert_rules(tmp_path / "alerts.yml", monitoring_alert_certificate_days=30)
    day = 86400
    case = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{
                "series": 'probe_ssl_earliest_cert_expiry{job="mlapi-blackbox", instance="https://api.example.com/"}',
                "values": f"{20 * day + 7200}x180",
            }],
            "alert_rule_test": [{
                "eval_time": "2h",
                "alertname": "MlapiCertificateExpiresSoon",
                "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "job": "mlapi-blackbox",
                                   "instance": "https://api.example.com/"},
                    "exp_annotations": {
                        "summary": "The certificate of https://api.example.com/ expires in 20d 0h 0m 0s",
                        "description": ALERTS["MlapiCertificateExpiresSoon"]["annotations"]["description"]
                        .replace("{{ $labels.instance }}", "https://api.example.com/").replace("14 days", "30 days"),
                        "runbook_url": "docs/runbook.md#mlapicertificateexpiressoon",
                    },
                }],
            }],
        }],
    }
    (tmp_path / "case.yml").write_text(yaml.safe_dump(case, sort_keys=False))
    result = promtool("test", "rules", "case.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_duration_left_out_is_refused_by_name(tmp_path: Path):
    durations = {alert: "1m" for alert in ALERTS if alert != "MlapiInstanceDown"}
    with pytest.raises(AssertionError, match="gives no for: duration for MlapiInstanceDown; give every alert one"):
        render_alert_rules(tmp_path / "alerts.yml", monitoring_alert_for=durations)
    assert not (tmp_path / "alerts.yml").exists()
