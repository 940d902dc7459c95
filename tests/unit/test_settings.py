"""Settings: defaults, parsing from the environment, and start-up errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError, load_settings, markdown_reference

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_safe_for_a_local_run():
    s = Settings()
    assert s.bind == "127.0.0.1:8000"
    assert s.rate_limit_storage_uri == "memory://"
    assert s.api_key_hashes == [] and not s.api_keys_required
    assert s.cors_origins == [] and s.trusted_hosts == []
    assert s.grpc_bind is None  # no gRPC unless asked for


def test_grpc_bind_takes_host_and_port_and_empty_means_off(monkeypatch):
    monkeypatch.setenv("MLAPI_GRPC_BIND", "[::1]:8501")
    assert load_settings().grpc_bind == "[::1]:8501"
    monkeypatch.setenv("MLAPI_GRPC_BIND", " ")
    assert load_settings().grpc_bind is None


def test_values_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLAPI_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    monkeypatch.setenv("MLAPI_MODELS", '{"iris": {"versions": {"1": 90, "2": 10}, "shadow": "3"}}')
    monkeypatch.setenv("MLAPI_WORKERS", "3")
    s = load_settings()
    assert s.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    assert s.models["iris"].versions == {"1": 90.0, "2": 10.0}
    assert s.models["iris"].shadow == "3"
    assert s.workers == 3


def test_env_file_is_read(tmp_path, monkeypatch):
    env = tmp_path / "mlapi.env"
    env.write_text("MLAPI_MAX_BATCH_SIZE=7\n")
    monkeypatch.setenv("MLAPI_ENV_FILE", str(env))
    assert load_settings().max_batch_size == 7


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("MLAPI_WORKERS", "0", "greater than or equal to 1"),
        ("MLAPI_TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip", "'not-an-ip' is not an IP address"),
        ("MLAPI_API_KEY_HASHES", "plain-text-key", "SHA-256 hex digest"),
        ("MLAPI_RATE_LIMIT_PREDICT", "lots", "is not a rate limit"),
        ("MLAPI_RATE_LIMIT_STORAGE_URI", "mongodb://x", "redis://"),
        ("MLAPI_MODELS", '{"iris": {"versions": {}}}', "at least one version"),
        ("MLAPI_ENGINE", "tensorflow", "auto"),
        ("MLAPI_RETIRE_GRACE", "30", "must be less than MLAPI_GRACEFUL_TIMEOUT"),
        ("MLAPI_GRPC_BIND", "8501", "is not host:port"),
        ("MLAPI_GRPC_BIND", "127.0.0.1:99999", "is not host:port"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(monkeypatch, var, value, words):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert var in message
    assert words in message


def test_gunicorn_refuses_to_start_with_a_bad_setting():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "app/gunicorn_conf.py", "app.main:create_app()"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "MLAPI_WORKERS": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "MLAPI_WORKERS" in proc.stderr


def test_reference_documents_every_setting():
    text = markdown_reference()
    for name in Settings.model_fields:
        assert f"`MLAPI_{name.upper()}`" in text


def test_configuration_doc_lists_every_setting():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`MLAPI_{name.upper()}`" in doc, (
            f"docs/configuration.md lacks MLAPI_{name.upper()}: run make config-reference"
        )
