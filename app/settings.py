"""Every setting of the service, in one place.

Values come from environment variables prefixed ``MLAPI_`` (the systemd unit
loads them with ``EnvironmentFile=``) or from an env file named by
``MLAPI_ENV_FILE``. A bad value stops start-up with a message naming the
variable. ``docs/configuration.md`` is generated from this class
(``python -m app.settings --markdown``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_RATE = re.compile(r"^\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day|s|m|h|d)s?\s*$", re.I)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ModelRoute(BaseModel):
    """How requests for one model are split between its versions."""

    versions: dict[str, float] = Field(
        description="Weight per version; requests go to a version with probability weight/sum.",
    )
    shadow: str | None = Field(
        default=None,
        description="A version that scores the same requests off the response path.",
    )

    @field_validator("versions")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("give at least one version with a weight")
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be >= 0")
        if sum(v.values()) <= 0:
            raise ValueError("at least one weight must be > 0")
        return v


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Settings of the prediction service (environment variables ``MLAPI_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="MLAPI_", extra="ignore", case_sensitive=False, protected_namespaces=()
    )

    # Models
    models_dir: Path = Field(Path("models"), description="Folder of model packages: <name>/<version>/.")
    models: dict[str, ModelRoute] = Field(
        default_factory=dict,
        description=(
            'Routing table as JSON, e.g. {"iris": {"versions": {"1": 90, "2": 10}, "shadow": "3"}}. '
            "Models not named here serve their newest version."
        ),
    )
    default_model: str | None = Field(None, description="Model used by /v1/predict; default: the only or first model.")
    version_override: Literal["serving", "loaded"] = Field(
        "serving",
        description=(
            "Versions a client may choose (X-Model-Version, /versions/{v}/ routes): serving: only those with "
            "a weight above 0; loaded: any loaded version, shadow and weight-0 ones included."
        ),
    )
    engine: Literal["auto", "onnx", "sklearn"] = Field(
        "auto", description="auto: ONNX Runtime when the package holds a verified model.onnx, else scikit-learn."
    )

    # Input limits
    max_batch_size: int = Field(1000, ge=1, description="Most instances accepted by /v1/predict/batch.")
    max_body_bytes: int = Field(4_194_304, ge=1024, description="Largest request body accepted, in bytes (413 above).")
    max_abs_value: float = Field(1e9, gt=0, description="Largest absolute feature value accepted (422 above).")

    # Rate limits (slowapi / limits)
    rate_limit_enabled: bool = Field(True, description="Apply the per-client rate limits.")
    rate_limit_storage_uri: str = Field(
        "memory://",
        description="Shared limit store, e.g. redis://127.0.0.1:6379/0. memory:// is per process: dev only.",
    )
    rate_limit_store_timeout_seconds: float = Field(
        0.05,
        gt=0,
        le=5,
        description="Longest wait for the shared store per call; a store slower than this counts as down.",
    )
    rate_limit_store_retry_seconds: float = Field(
        5.0,
        ge=0.1,
        le=300,
        description="After a store failure, how long requests go on without limits before the store is asked again.",
    )
    rate_limit_predict: str = Field("1200/minute", description="Limit per client on prediction routes.")
    rate_limit_default: str = Field("600/minute", description="Limit per client on the other API routes.")

    # Clients, proxies, auth
    trusted_proxies: CsvList = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Peers (IPs or CIDRs) whose X-Forwarded-For is believed; comma-separated.",
    )
    api_key_hashes: CsvList = Field(
        default_factory=list,
        description="SHA-256 hex digests of accepted X-API-Key values; empty means no key is required.",
    )
    api_key_failure_limit: str = Field(
        "10/minute",
        description=(
            "Wrong X-API-Key values a client (address) may send per window; over it, every request of that "
            "client that needs a key gets 429 until the window ends, a right key included."
        ),
    )
    docs: Literal["on", "off"] = Field(
        "on",
        description=(
            "Serve /openapi.json (every feature, with its reference mean as the example) and the pages that "
            "show it, /docs and /redoc, with their assets under /docs/static/; with MLAPI_API_KEY_HASHES set "
            "the schema needs the X-API-Key header too, and the pages ask for it."
        ),
    )
    cors_origins: CsvList = Field(default_factory=list, description="Allowed CORS origins; empty: CORS off.")
    trusted_hosts: CsvList = Field(default_factory=list, description="Allowed Host headers; empty: any.")

    # Drift
    drift_window: int = Field(1000, ge=10, description="Recent inputs kept per worker for drift scores.")
    drift_min_samples: int = Field(100, ge=10, description="Inputs needed before a drift score is reported.")
    drift_alert_psi: float = Field(0.2, gt=0, description="PSI at or above which a feature is reported as drifted.")

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of all loggers.")
    access_log: bool = Field(True, description="Write one JSON access line per request.")

    # Prediction log (app/serving/predictionlog.py)
    prediction_log_sample: float = Field(
        0.0, ge=0, le=1, description=(
            "Fraction of scored requests whose inputs and outputs go to the prediction log, e.g. 0.05 "
            "(0: off)."
        ),
    )
    prediction_log_path: str = Field(
        "journal", min_length=1, description=(
            "Where the prediction log goes: a file (JSON lines, rotated by size; several workers may share it) "
            "or journal: JSON lines on stdout under the logger mlapi.predictions."
        ),
    )
    prediction_log_redact: CsvList = Field(
        default_factory=list,
        description='Features whose values the prediction log replaces with "[redacted]"; comma-separated.',
    )
    prediction_log_max_bytes: int = Field(
        100 * 1024 * 1024, ge=4096, description="Size in bytes at which the prediction log file is rotated."
    )
    prediction_log_backups: int = Field(
        5, ge=0, le=100, description="Rotated prediction log files kept (<path>.1 newest); older ones are deleted."
    )
    prediction_log_queue_rows: int = Field(
        10_000, ge=1, description=(
            "Rows waiting to be written per worker; a record that does not fit is dropped and counted, "
            "so a slow or failing sink never holds up a prediction."
        ),
    )

    # Process model (read by app/gunicorn_conf.py)
    bind: str = Field("127.0.0.1:8000", description="gunicorn bind address: host:port or unix:/path.")
    grpc_bind: str | None = Field(
        None,
        description=(
            "host:port of the gRPC Open Inference Protocol, served by every worker (SO_REUSEPORT); "
            "empty: no gRPC."
        ),
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="gunicorn worker processes (default: CPU count)."
    )
    max_requests: int = Field(10000, ge=0, description="Requests after which a worker is recycled (0: never).")
    max_requests_jitter: int = Field(1000, ge=0, description="Random jitter added to max_requests.")
    timeout: int = Field(30, ge=1, description="Seconds a silent worker lives before it is killed.")
    graceful_timeout: int = Field(30, ge=1, description="Seconds a worker gets to finish requests on reload/stop.")
    keepalive: int = Field(
        75, ge=1, description="Keep-alive seconds; longer than NGINX's upstream keepalive_timeout (60s)."
    )
    retire_grace: float = Field(
        1.0,
        ge=0,
        description=(
            "Seconds a retiring worker (recycled, reloaded, stopped) keeps an idle kept-alive connection open "
            "for a request already on its way, answered with Connection: close."
        ),
    )
    limit_concurrency: int = Field(
        256,
        ge=0,
        description=(
            "Connections or requests in flight per worker above which a request is answered 503 at once (0: no limit)."
        ),
    )
    onnx_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per worker.")
    metrics_dir_min_free_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description=(
            "Free bytes on the filesystem of PROMETHEUS_MULTIPROC_DIR below which the master logs a warning "
            "when a worker exits."
        ),
    )

    @field_validator(
        "trusted_proxies", "api_key_hashes", "cors_origins", "trusted_hosts", "prediction_log_redact", mode="before"
    )
    @classmethod
    def _csv(cls, v: object) -> object:
        return _split_csv(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return v

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        v = [h.lower() for h in v]
        for h in v:
            if not _SHA256_HEX.match(h):
                raise ValueError(
                    "each entry must be a SHA-256 hex digest (64 hex characters); "
                    "make one with: printf %s 'the-key' | sha256sum"
                )
        return v

    @field_validator("rate_limit_predict", "rate_limit_default", "api_key_failure_limit")
    @classmethod
    def _rate(cls, v: str) -> str:
        from limits import parse_many

        try:
            parse_many(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a rate limit like '100/minute' or '10 per second'") from None
        return v

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not re.match(r"^(memory|redis|rediss|redis\+unix)://", v):
            raise ValueError("use memory:// (single process only) or redis://host:port/db")
        return v

    @field_validator("grpc_bind", mode="before")
    @classmethod
    def _grpc_bind(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str):
            host, _, port = v.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{v!r} is not host:port, e.g. 127.0.0.1:8501 or [::1]:8501")
            return v.strip()
        return v

    @model_validator(mode="after")
    def _retire_within_graceful_timeout(self) -> Settings:
        if self.retire_grace >= self.graceful_timeout:
            raise ValueError(
                f"MLAPI_RETIRE_GRACE ({self.retire_grace}) must be less than MLAPI_GRACEFUL_TIMEOUT "
                f"({self.graceful_timeout}), or workers are killed before they finish their requests"
            )
        return self

    @model_validator(mode="after")
    def _routes(self) -> Settings:
        for name, route in self.models.items():
            if route.shadow is not None and route.shadow in route.versions and len(route.versions) == 1:
                raise ValueError(f"model {name!r}: the shadow version must differ from the only primary version")
        return self

    @property
    def api_keys_required(self) -> bool:
        return bool(self.api_key_hashes)


class SettingsError(SystemExit):
    """Start-up stops with a message that names every bad variable."""


def load_settings(**overrides: Any) -> Settings:
    env_file = os.environ.get("MLAPI_ENV_FILE")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        lines = ["invalid settings, the service will not start:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            var = "MLAPI_" + str(err["loc"][0]).upper() if err["loc"] else "MLAPI_*"
            lines.append(f"  {var} ({field}): {err['msg']}")
        lines.append("fix the variable(s) above in the environment or the env file and start again.")
        raise SettingsError("\n".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def markdown_reference() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            try:
                default = field.default_factory()  # type: ignore[call-arg]
            except TypeError:
                default = "(computed)"
        else:
            default = field.default
        if name == "workers":
            default = "CPU count"
        if isinstance(default, list):
            default = ",".join(default)
        rows.append(f"| `MLAPI_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    if "--markdown" in sys.argv:
        print(markdown_reference(), end="")
    else:
        print(get_settings().model_dump_json(indent=2))
