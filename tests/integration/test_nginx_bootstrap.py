"""Before the certificate exists the nginx role serves port 80 only: ACME challenges and the redirect; and
the role renders its snippets from `nginx_templates_dir` and removes those it no longer renders."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from scripts.harness.nginx import render
from scripts.harness.roles import render_role
from scripts.harness.servers import VENV_BIN, free_port

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "nginx"

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


def test_snippets_the_role_no_longer_renders_are_removed(bootstrap_edge):
    """A host configured by an older layout (flat snippets) keeps none of its files once the new one is valid."""
    snippets = bootstrap_edge.prefix / "mlapi"
    stale = [snippets / "tls.conf", snippets / "rate-limit.conf", snippets / "http" / "renamed.conf"]
    for path in stale:
        path.write_text("# an older snippet\n")
    render_role("nginx", "config", bootstrap_edge.variables)
    assert [path for path in stale if path.exists()] == []
    assert (snippets / "http" / "tls.conf").is_file() and (snippets / "location" / "rate-limit.conf").is_file()


def test_the_templates_come_from_nginx_templates_dir(tmp_path):
    """A fork's own copy of deploy/nginx is what the role renders when nginx_templates_dir names it."""
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    tls = templates / "snippets" / "http" / "tls.conf.j2"
    tls.write_text(tls.read_text() + "# from the fork's templates\n")
    edge = render(tmp_path / "nginx", [free_port()], with_certificate=False, nginx_templates_dir=str(templates))
    assert "# from the fork's templates" in (edge.prefix / "mlapi" / "http" / "tls.conf").read_text()
