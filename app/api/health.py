"""Liveness, readiness and metrics: never rate limited, never behind an API key."""

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.deps import RegistryDep
from app.errors import error_response
from app.metrics import render
from app.responses import FastJSONResponse

router = APIRouter(tags=["health"])


def readiness(request: Request) -> tuple[bool, list[str]]:
    """Ready when at least one model is loaded: local state only.

    The shared rate-limit store is not part of it. Every instance shares that store, so a store fault would
    turn every instance unready at once (all deploy gates failing, every load-balancer target flapping),
    while the instances serve perfectly well without limits; its health is /healthz/store and a metric.
    """
    registry = request.app.state.registry
    if not registry.loaded:
        return False, [registry.last_error or "no model loaded"]
    return True, []


def store_answers(request: Request) -> bool:
    return bool(request.app.state.rate_store.check(request.app.state.limiter.limiter.storage))


@router.get("/", summary="Liveness as KServe's V1 protocol asks it (its SDK's is_server_live)")
async def root() -> dict[str, Any]:
    return {"status": "alive"}


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: at least one model loaded (else 503)")
def readyz(request: Request, registry: RegistryDep) -> Response:
    ready, reasons = readiness(request)
    if not ready:
        return error_response(request, 503, "not ready: " + "; ".join(reasons))
    return FastJSONResponse(
        {
            "status": "ready",
            "models": {name: sorted(s.versions) for name, s in registry.models.items()},
        }
    )


@router.get(
    "/healthz/store",
    summary="The shared rate-limit store: 200 when it answers, 503 while requests go on without limits",
)
def store_health(request: Request) -> Response:
    if not store_answers(request):
        return error_response(
            request, 503,
            "the rate-limit store does not answer: requests are served without rate limits until it does",
        )
    return FastJSONResponse({"status": "ok", "shared": request.app.state.rate_store.shared})


@router.get("/metrics", summary="Prometheus metrics, summed over all workers", include_in_schema=False)
def metrics(request: Request) -> Response:
    store_answers(request)  # keeps mlapi_rate_limit_store_up current between requests
    body, content_type = render()
    return Response(body, media_type=content_type)
