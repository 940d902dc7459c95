"""JSON logs for everything: the app, gunicorn's master and workers, uvicorn.

One dictConfig serves both the service and gunicorn (``logconfig_dict`` in
``app/gunicorn_conf.py``), so every line on stdout/stderr is one JSON object.
"""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

ACCESS_LOGGER = "mlapi.access"
APP_LOGGER = "mlapi"
PREDICTION_LOGGER = "mlapi.predictions"  # the prediction log's journal sink (app/serving/predictionlog.py)


class RequestIdFilter(logging.Filter):
    """Adds the current request id to every record made while serving a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        record.__dict__.pop("color_message", None)  # uvicorn's terminal-colour copy of the message
        return True


class ServiceJsonFormatter(OrjsonFormatter):
    """ISO timestamps, the level name, and tracebacks in an ``exc_info`` field.

    Serialized by orjson: one access line per request makes this formatter part of the hot
    path, and orjson encodes it (timestamp included) several times faster than the json module.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timestamp", "timestamp")
        kwargs.setdefault(
            "rename_fields", {"levelname": "level", "name": "logger", "exc_info": "traceback"}
        )
        super().__init__(*args, **kwargs)

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["pid"] = record.process  # which gunicorn worker wrote the line
        if log_record.get("request_id") is None:
            log_record.pop("request_id", None)


def logging_config(level: str = "INFO") -> dict[str, Any]:
    fmt = "%(levelname)s %(name)s %(message)s %(request_id)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": ServiceJsonFormatter, "fmt": fmt}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["request_id"],
            },
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["request_id"],
            },
        },
        "loggers": {
            APP_LOGGER: {"handlers": ["stderr"], "level": level, "propagate": False},
            ACCESS_LOGGER: {"handlers": ["stdout"], "level": "INFO", "propagate": False},
            PREDICTION_LOGGER: {"handlers": ["stdout"], "level": "INFO", "propagate": False},
            "gunicorn.error": {"handlers": ["stderr"], "level": level, "propagate": False},
            # The service writes its own access line with the fields operators need.
            "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


def configure_logging(level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(level))


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{APP_LOGGER}.{name}" if name else APP_LOGGER)
