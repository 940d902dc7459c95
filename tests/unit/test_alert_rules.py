"""deploy/monitoring/alerts.yml: valid for Prometheus, and each alert fires on its trouble and only then.

The cases are the test groups of alert_rules_test.yml, a promtool test file; each runs as its own test so
a failure names the alert and the case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.monitoring import ALERT_RULES, ROOT, alert_rules, exported_metric_names, mlapi_metrics_in, promtool

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
    result = promtool("check", "rules", ALERT_RULES)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", GROUPS)
def test_alert_case(name: str, tmp_path: Path):
    cases = {
        "rule_files": [str(ALERT_RULES)],
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
