"""POST /v1/predict and friends: one instance or a batch, for the default model or a named one.

Routes are made per model from its manifest, so each body schema names the
model's real features. Endpoints are plain ``def``: FastAPI runs them in its
threadpool, so inference never blocks the event loop.
"""

# No `from __future__ import annotations`: FastAPI reads the per-model body
# types from these closures' annotations at route creation.

import inspect
from typing import Any

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import BaseModel
from slowapi import Limiter

from app.deps import ApiKey, RegistryDep, UserId, VersionOverride
from app.errors import APIError
from app.inference import Scored, score, shadow_score
from app.packaging import Manifest
from app.registry import ModelRegistry, UnknownModel
from app.responses import FastJSONResponse
from app.schemas import ERROR_RESPONSES, BatchPrediction, Prediction, request_models
from app.security import shared_limit
from app.settings import Settings


def _matrix(instances: list[BaseModel], names: tuple[str, ...]) -> np.ndarray:
    return np.array([[inst.__dict__[n] for n in names] for inst in instances], dtype=np.float64)


def _run(
    request: Request,
    registry: ModelRegistry,
    background: BackgroundTasks,
    name: str,
    X: np.ndarray,
    user_id: str | None,
    version: str | None,
) -> Scored:
    try:
        served = registry.get(name)
        scored = score(registry, served, X, user_id=user_id, version=version, state=request.state)
    except UnknownModel as exc:
        raise APIError(404, str(exc), code="model_not_found") from None
    if served.shadow is not None:
        background.add_task(shadow_score, served, scored, X, request.state.request_id)
    return scored


def build_router(manifests: dict[str, Manifest], default: str | None, settings: Settings, limiter: Limiter) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[ApiKey], responses=ERROR_RESPONSES)
    # One budget per client across every prediction route.
    limit = shared_limit(limiter, settings, settings.rate_limit_predict, "predict")

    for name, manifest in manifests.items():
        single_body, batch_body = request_models(manifest, settings.max_abs_value, settings.max_batch_size)
        names = tuple(f.name for f in manifest.features)
        for batch, body_type in ((False, single_body), (True, batch_body)):
            suffix = "/predict/batch" if batch else "/predict"
            paths = [f"/models/{name}{suffix}"] + ([f"{suffix}"] if name == default else [])
            for path in paths:
                _add_route(router, path, name, names, body_type, limit, batch=batch, versioned=False)
            _add_route(router, f"/models/{name}/versions/{{version}}{suffix}", name, names, body_type, limit,
                       batch=batch, versioned=True)
    return router


def _single_response(scored: Scored, request_id: str) -> dict[str, Any]:
    probabilities = scored.probability_maps()
    return {
        "model": scored.model.name,
        "version": scored.model.version,
        "prediction": scored.predictions()[0],
        "probabilities": probabilities[0] if probabilities is not None else None,
        "request_id": request_id,
    }


def _batch_response(scored: Scored, request_id: str) -> dict[str, Any]:
    return {
        "model": scored.model.name,
        "version": scored.model.version,
        "predictions": scored.predictions(),
        "probabilities": scored.probability_maps(),
        "request_id": request_id,
    }


def _add_route(
    router: APIRouter,
    path: str,
    name: str,
    names: tuple[str, ...],
    body_type: type,
    limit: Any,
    *,
    batch: bool,
    versioned: bool,
) -> None:
    respond = _batch_response if batch else _single_response

    def endpoint(
        request: Request,
        version: str | None = None,
        *,
        body: Any,
        background: BackgroundTasks,
        registry: RegistryDep,
        user_id: UserId = None,
        model_version: VersionOverride = None,
    ) -> FastJSONResponse:
        X = _matrix(body.instances if batch else [body.features], names)
        scored = _run(request, registry, background, name, X, user_id, version or model_version)
        return FastJSONResponse(respond(scored, request.state.request_id))

    operation_id = _operation_id("predict_batch" if batch else "predict", path)
    _bind(endpoint, body_type, versioned, operation_id)
    what = "a batch of instances in one call into the model" if batch else "one instance"
    router.add_api_route(
        path,
        limit(endpoint),
        methods=["POST"],
        response_model=BatchPrediction if batch else Prediction,
        summary=f"Predict {what} with model {name!r}" + (" at a given version" if versioned else ""),
        operation_id=operation_id,
    )


def _bind(endpoint: Any, body_type: type, versioned: bool, operation_id: str) -> None:
    """Give the endpoint its model's body type, and a path parameter `version` only where the path has one.

    Each closure also gets its own name: slowapi files limits by function name,
    and closures sharing one would each count every request again.
    """
    endpoint.__name__ = endpoint.__qualname__ = operation_id
    params = []
    for param in inspect.signature(endpoint).parameters.values():
        if param.name == "body":
            param = param.replace(annotation=body_type)
        elif param.name == "version":
            if not versioned:
                continue
            param = param.replace(annotation=str, default=inspect.Parameter.empty)
        params.append(param)
    endpoint.__signature__ = inspect.signature(endpoint).replace(parameters=params)


def _operation_id(kind: str, path: str) -> str:
    return kind + "_" + "".join(ch if ch.isalnum() else "_" for ch in path).strip("_")
