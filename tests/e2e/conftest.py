"""End-to-end fixtures: real Ubuntu 24.04 hosts under systemd-nspawn (scripts/sandbox/sandbox)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scripts.harness.sandbox import Sandbox

# Tests that bring up and tear down a sandbox of their own run before any test uses the shared one,
# so they never take away hosts that a provisioned fixture still relies on; the cluster tests replace the
# shared single host with three hosts, so they run after every other test. The rebuild tests throw the
# shared host's disk away (and provision it again), so they come after the other single-host tests. The OS
# matrix has sandboxes of its own and comes last, so that its hosts never share the machine with a sandbox load
# test (under `make test` the other pytest process may still run integration tests beside them).
LIFECYCLE_TESTS = ("tests/e2e/test_sandbox_lifecycle.py::",)
REBUILD_TESTS = ("tests/e2e/test_deploy_tls_rebuild.py::",)
CLUSTER_TESTS = ("tests/e2e/test_cluster.py::",)
MATRIX_TESTS = ("tests/e2e/test_os_matrix.py::",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: (not item.nodeid.startswith(LIFECYCLE_TESTS), item.nodeid.startswith(MATRIX_TESTS),
                                 item.nodeid.startswith(CLUSTER_TESTS), item.nodeid.startswith(REBUILD_TESTS)))


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox host in every group (lb, app, redis), reused if already up; removed at the end of the
    session unless MLAPI_KEEP_SANDBOX=1."""
    keep = os.environ.get("MLAPI_KEEP_SANDBOX") == "1"
    try:
        box = Sandbox.up(hosts=1)
    except Exception:
        if not keep:  # a half-started sandbox is removed too; keep it to read .sandbox/logs
            Sandbox.down()
        raise
    yield box
    if not keep:
        Sandbox.down()
