"""Before the certificate exists the nginx role serves port 80 only: ACME challenges and the redirect."""

from __future__ import annotations

import socket
import subprocess

import pytest

from nginx_helpers import VENV_BIN, free_port, render

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bootstrap_edge(tmp_path_factory):
    edge = render(tmp_path_factory.mktemp("bootstrap") / "nginx", [free_port()], with_certificate=False)
    edge.start()
    yield edge
    edge.stop()


def test_lint_nginx_t_accepts_the_configuration_without_certificate(bootstrap_edge):
    result = subprocess.run(
        ["nginx", "-t", "-c", str(bootstrap_edge.prefix / "nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_acme_challenge_is_served_before_the_certificate_exists(bootstrap_edge):
    challenges = bootstrap_edge.prefix / "acme" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / "first-token").write_text("first-token.thumbprint")
    response = bootstrap_edge.http("GET", "/.well-known/acme-challenge/first-token")
    assert (response.status, response.body) == (200, b"first-token.thumbprint")


def test_https_is_not_served_before_the_certificate_exists(bootstrap_edge):
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", bootstrap_edge.https_port)) != 0


def test_lint_gixy_accepts_the_configuration_without_certificate(bootstrap_edge):
    result = subprocess.run(
        [str(VENV_BIN / "gixy"), str(bootstrap_edge.prefix / "nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, f"gixy reports issues; change the templates in deploy/nginx/:\n{result.stdout}"
