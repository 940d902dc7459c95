"""GET /v1/models and /v1/models/{name}: what is loaded, from its manifest, with engine and drift."""

from typing import Any

from fastapi import APIRouter, Request
from slowapi import Limiter

from app.api.deps import ApiKey, RegistryDep
from app.api.schemas import ERROR_RESPONSES
from app.api.security import shared_limit
from app.errors import APIError
from app.packages.gate import ModelVersion
from app.responses import FastJSONResponse
from app.serving.registry import ModelRegistry, ServedModel, UnknownModel
from app.settings import Settings


def version_info(registry: ModelRegistry, served: ServedModel, model: ModelVersion) -> dict[str, Any]:
    m = model.manifest
    return {
        "version": model.version,
        "engine": model.engine.name,
        "task": m.task,
        "created": m.created,
        "features": [f.to_dict() for f in m.features],
        "classes": m.classes,
        "metrics": m.metrics,
        "runtime_versions": m.versions,
        "onnx": m.onnx,
        # The row the deploy gates send, and the answer recorded when the package was built (null before).
        "smoke": m.smoke,
        "weight": served.weights.get(model.version, 0.0),
        "shadow": served.shadow == model.version,
        "drift": registry.state(model).drift.status(),
    }


def model_info(registry: ModelRegistry, served: ServedModel) -> dict[str, Any]:
    return {
        "name": served.name,
        # KServe's V1 protocol reads this (its SDK's is_model_ready): a listed model is loaded and serving.
        "ready": True,
        "default_version": served.default_version,
        "versions": [version_info(registry, served, m) for m in served.versions.values()],
        "refused": served.failures,
    }


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[ApiKey], responses=ERROR_RESPONSES)
    limit = shared_limit(limiter, settings, settings.rate_limit_default, "api")

    @router.get("", summary="Every loaded model with its versions, features, metrics, engine and drift")
    @limit
    def list_models(request: Request, registry: RegistryDep) -> FastJSONResponse:
        return FastJSONResponse(
            {
                "default_model": registry.default_name,
                "models": [model_info(registry, s) for s in registry.models.values()],
            }
        )

    @router.get("/{name}", summary="One model: its versions, features, metrics, engine and drift status")
    @limit
    def get_model(request: Request, name: str, registry: RegistryDep) -> FastJSONResponse:
        try:
            served = registry.get(name)
        except UnknownModel as exc:
            raise APIError(404, str(exc), code="model_not_found") from None
        return FastJSONResponse(model_info(registry, served))

    return router
