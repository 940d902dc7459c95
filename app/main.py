"""The application factory.

``create_app()`` builds the app from settings. Models are loaded by
``app.state.registry.load()``: in the gunicorn master before workers fork
(``app/gunicorn_conf.py``, so their memory is shared copy-on-write), or in the
lifespan when the app runs without a preloading master (tests, a plain uvicorn).

The /v1 prediction routes, their request schemas and /openapi.json are made from
manifests. After each load in the gunicorn master (start and SIGHUP) the master
builds the app again from the registry that loaded (``create_app(settings,
registry)``), and the workers it forks next serve that one: the contract follows
the versions the gate let through, and a refused package shapes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from slowapi import Limiter
from starlette.middleware.trustedhost import TrustedHostMiddleware

from app import __version__
from app.api import docs, health, models, predict, v2
from app.api.schemas import request_models
from app.api.security import rate_limit_key
from app.errors import ErrorShapes, install_error_handlers
from app.logs import configure_logging, get_logger
from app.packages.gate import discover
from app.packages.manifest import Manifest, PackageError
from app.responses import FastJSONResponse
from app.server.middleware import RequestContextMiddleware
from app.server.ratestore import RateStore
from app.serving.predictionlog import PredictionLog
from app.serving.registry import ModelRegistry, _version_key
from app.settings import Settings, get_settings

log = get_logger("app")


def serving_manifests(registry: ModelRegistry) -> dict[str, Manifest]:
    """The manifest of the version that takes most of each loaded model's traffic: it shapes the schema
    shown for that model's routes. Every request is still checked against the version that scores it."""
    return {name: served.versions[served.default_version].manifest for name, served in registry.models.items()}


def route_manifests(settings: Settings) -> dict[str, Manifest]:
    """Before any load: the newest valid manifest of each model, read from the models folder.

    Only manifest.json is read here (no unpickling); the full gate runs at load.
    Never raises: a manifest that cannot be read or shaped into a schema is
    skipped (the gate refuses its package by name at load), and a models folder
    that cannot be listed gives no routes (the service stays up, unready).
    """
    models_dir = Path(settings.models_dir)
    try:
        found = discover(models_dir)
    except PackageError:
        found = {}
    manifests: dict[str, Manifest] = {}
    for name in sorted(set(found) | set(settings.models)):
        versions = sorted(found.get(name, []), key=_version_key, reverse=True)
        route = settings.models.get(name)
        if route is not None:
            versions = sorted(route.versions, key=lambda v: -route.versions[v]) + versions
        for version in versions:
            manifest = _routable(name, version, settings, models_dir / name / version / "manifest.json")
            if manifest is not None:
                manifests[name] = manifest
                break
    return manifests


def _routable(name: str, version: str, settings: Settings, source: Manifest | Path) -> Manifest | None:
    """The manifest (given, or read from its file) if a request schema can be made from it; else None, logged."""
    try:
        manifest = source if isinstance(source, Manifest) else Manifest.from_dict(json.loads(source.read_bytes()))
        request_models(manifest, settings.max_abs_value, settings.max_batch_size)
    except Exception as exc:  # anything: one model's manifest never stops the app from being built
        log.warning("no routes from this manifest", extra={
            "model": name, "version": version, "detail": f"{type(exc).__name__}: {exc}"})
        return None
    return manifest


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The app; with a registry that has loaded, its routes are made from what the registry serves."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    if registry is None:
        registry = ModelRegistry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not registry.loaded and registry.last_error is None:
            registry.load()
        rpc = None
        if settings.grpc_bind:
            # Imported here, in the worker: the master that forks the workers never loads gRPC's core.
            from app.rpc.server import start

            rpc = await start(app, settings)
        yield
        if rpc is not None:
            await rpc.stop(settings.graceful_timeout / 4)  # RPCs in flight finish, new ones are refused
        prediction_log.close()  # in each worker: what is queued is written before it exits

    app = FastAPI(
        title="mlapi",
        version=__version__,
        description="Predictions from scikit-learn model packages. Errors share one JSON shape; see each route.",
        default_response_class=FastJSONResponse,
        lifespan=lifespan,
        # Served by app/api/docs.py, behind the API key when keys are required.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    rate_store = RateStore(settings)
    limiter = Limiter(
        key_func=rate_limit_key,
        storage_uri=rate_store.uri,
        storage_options=rate_store.options,
        strategy="fixed-window",
        enabled=settings.rate_limit_enabled,
        # The guarded store answers "within limits" when it fails; anything else it raises is logged, not a 500.
        swallow_errors=True,
        key_prefix="mlapi",
    )
    app.state.limiter = limiter
    app.state.rate_store = rate_store

    if registry.loaded:
        manifests = {name: manifest for name, candidate in serving_manifests(registry).items()
                     if (manifest := _routable(name, candidate.version, settings, candidate)) is not None}
        default = registry.default_name
    else:
        manifests = route_manifests(settings)
        default = settings.default_model or next(iter(sorted(manifests)), None)
    prediction_log = PredictionLog(settings, features={f for m in manifests.values() for f in m.feature_names})
    app.state.prediction_log = prediction_log
    routers = [
        health.router,
        predict.build_router(manifests, default, settings, limiter),
        models.build_router(settings, limiter),
        v2.build_router(settings, limiter),
        *([docs.router] if settings.docs == "on" else []),
    ]
    for router in routers:
        app.include_router(router)
    # Each router marked its routes with the shape of their errors (app/errors.py).
    app.state.error_shapes = ErrorShapes(route for router in routers for route in router.routes)
    install_error_handlers(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "X-Request-ID", "X-User-ID", "X-Model-Version"],
        )
    if settings.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
        trusted_proxies=settings.trusted_proxies,
    )
    return app
