"""Liveness, readiness and metrics: never rate limited, never behind an API key."""

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import RegistryDep
from app.errors import error_response
from app.metrics import render
from app.responses import FastJSONResponse

router = APIRouter(tags=["health"])


def readiness(request: Request) -> tuple[bool, list[str]]:
    """Ready when at least one model is loaded and the rate-limit store answers."""
    reasons = []
    registry = request.app.state.registry
    if not registry.loaded:
        reasons.append(registry.last_error or "no model loaded")
    settings = request.app.state.settings
    if settings.rate_limit_enabled:
        try:
            ok = request.app.state.limiter.limiter.storage.check()
        except Exception as exc:  # any failure of the store means not ready
            ok = False
            reasons.append(f"rate-limit store {settings.rate_limit_storage_uri} failed: {exc}")
        else:
            if not ok:
                reasons.append(f"rate-limit store {settings.rate_limit_storage_uri} does not answer")
    return not reasons, reasons


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and the rate-limit store answers (else 503)")
def readyz(request: Request, registry: RegistryDep) -> Response:
    ready, reasons = readiness(request)
    if not ready:
        return error_response(request.url.path, 503, "not ready: " + "; ".join(reasons))
    return FastJSONResponse(
        {
            "status": "ready",
            "models": {name: sorted(s.versions) for name, s in registry.models.items()},
        }
    )


@router.get("/metrics", summary="Prometheus metrics, summed over all workers", include_in_schema=False)
def metrics() -> Response:
    body, content_type = render()
    return Response(body, media_type=content_type)
