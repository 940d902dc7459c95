"""Certificate renewal against Pebble while a client keeps sending: the deploy hook reloads NGINX and the new
certificate is served with no failed request (issue 3, test 6)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from scripts.harness.deploy import (
    continuous_client,
    forced_renewal_command,
    require_provisioned,
    wait_until_every_instance_serves,
)

pytestmark = pytest.mark.e2e


def served_serial(sandbox) -> str:
    context = ssl.create_default_context(cafile=str(sandbox.ca))
    with socket.create_connection((sandbox.ip, 443), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sandbox.domain) as tls:
        return tls.getpeercert()["serialNumber"]


def serial_after_renewal(sandbox, before: str, timeout: float = 30.0) -> str:
    """The serial served once NGINX has reloaded: `nginx -s reload` returns before the old workers stop
    accepting, so a handshake right after the deploy hook may still meet an old worker."""
    deadline = time.monotonic() + timeout
    serial = served_serial(sandbox)
    while serial == before and time.monotonic() < deadline:
        time.sleep(0.5)
        serial = served_serial(sandbox)
    return serial


def test_forced_renewal_serves_the_new_certificate_without_failed_requests(sandbox):
    require_provisioned(sandbox)
    wait_until_every_instance_serves(sandbox)
    host = sandbox.host(sandbox.ip)
    before = served_serial(sandbox)
    with continuous_client(sandbox) as load:
        result = sandbox.ssh(host, forced_renewal_command(sandbox.domain), timeout=300)
    assert result.returncode == 0, f"certbot renew failed:\n{result.stdout}\n{result.stderr}"
    after = serial_after_renewal(sandbox, before)
    assert after != before, "HTTPS still serves the old certificate: the deploy hook did not reload NGINX"
    # The deploy hook reloads NGINX once: the one request a reload may meet on a closing idle connection is spared.
    assert load.result.failures_beyond_reloads(1) == [], load.result.summary()
