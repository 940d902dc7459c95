"""POST /v1/predict and friends: one instance or a batch, for the default model or a named one.

Routes are made per model from its manifest, so each body schema names the
model's real features. The body is only parsed here: its features are checked
and turned into the estimator's input by app/packages/validation.py, with the manifest
of the version that scores the request; this module only maps the problems'
locations onto the body (``["body", "features", name]``). Endpoints are plain ``def``, run in the threadpool so
inference does not block the event loop, except a single row of a model whose
measured cost is below a thread hand-off (app/serving/inference.py), scored inline.

These routes are the service's hot path. FastAPI's generic request handling
(dependency solving, content-type parsing, JSON decoding, then validation)
costs several times a small model's inference, so a well-formed request takes a
shortcut (``PredictRoute``): the body is validated straight from JSON bytes and
the same endpoint is called with the same arguments. Anything else, every error
included, goes through FastAPI unchanged, so errors keep one code path. Each route
is checked as it is built (``_check_shortcut``): a dependency or parameter the
shortcut would not solve as FastAPI does stops the app from being built.
"""

# No `from __future__ import annotations`: FastAPI reads the per-model body
# types from these closures' annotations at route creation.

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from slowapi import Limiter
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import (
    MODEL_VERSION_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
    ApiKey,
    RegistryDep,
    UserId,
    VersionOverride,
    api_key,
    get_registry,
    route_endpoint,
)
from app.api.schemas import (
    ERROR_RESPONSES,
    PROTOCOL_ERROR_RESPONSES,
    BatchPrediction,
    KServePrediction,
    Prediction,
    request_models,
)
from app.api.security import shared_limit
from app.errors import APIError, ErrorShape, shape_errors
from app.packages.gate import ModelVersion
from app.packages.manifest import Manifest
from app.packages.validation import ValidationFailure
from app.responses import FastJSONResponse
from app.serving.inference import PredictionResult, compare_shadow, predict, runs_inline
from app.serving.registry import ModelRegistry, UnknownModel
from app.settings import Settings

INVALID_FEATURES = "the request body does not match the schema; see details for each field"


def _invalid(exc: ValidationFailure, batch: bool) -> APIError:
    """The core's problems at their place in the body: [row, feature] is instances.row.feature or features.feature."""
    details = []
    for d in exc.details:
        loc = list(d["loc"])
        where = ["body", "instances", *loc] if batch else ["body", "features", *loc[1:]]
        details.append({"loc": where if loc else ["body"], "msg": d["msg"]})
    return APIError(422, INVALID_FEATURES, details=details)


def _run(
    request: Request,
    registry: ModelRegistry,
    background: BackgroundTasks,
    name: str,
    rows: list[Any],
    batch: bool,
    user_id: str | None,
    version: str | None,
) -> PredictionResult:
    max_abs = registry.settings.max_abs_value

    def decode(model: ModelVersion) -> Any:
        return model.inputs.rows(rows, max_abs)

    try:
        served = registry.get(name)
        scored = predict(registry, served, decode, user_id=user_id, version=version, state=request.state)
    except UnknownModel as exc:
        raise APIError(404, str(exc), code="model_not_found") from None
    except ValidationFailure as exc:
        raise _invalid(exc, batch) from None
    request.app.state.prediction_log.write(request.state, scored)
    if served.shadow is not None:
        background.add_task(compare_shadow, served, scored, request.state.request_id)
    return scored


# What the shortcut (_arguments) solves without FastAPI, and how: every parameter of a prediction endpoint, the
# headers two of them come from, the dependency one of them is, and the router's one dependency. Each route is
# held to exactly this when it is built (_check_shortcut), so that nothing FastAPI would solve is skipped.
SHORTCUT_PARAMETERS = frozenset({"request", "body", "background", "registry", "user_id", "model_version"})
SHORTCUT_HEADERS = {"user_id": "x-user-id", "model_version": "x-model-version"}
SHORTCUT_DEPENDENCIES: dict[str, Any] = {"registry": get_registry}
ROUTER_DEPENDENCIES = (api_key,)


@dataclass(frozen=True)
class Shortcut:
    """What a prediction route's endpoint needs, solved without FastAPI for a well-formed request."""

    name: str
    body_type: type[BaseModel]
    batch: bool
    versioned: bool
    limited: bool  # a rate limit is checked in the endpoint: it calls the store, so never on the event loop


class PredictRoute(APIRoute):
    shortcut: Shortcut | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcut = self.shortcut
        if shortcut is None or scope["method"] != "POST" or not _json_content(scope):
            await super().handle(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            message = await receive()  # the body size limit is enforced by the middleware's receive
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        solved = None
        if message["type"] == "http.request":
            solved = await _arguments(scope, shortcut, b"".join(m.get("body", b"") for m in messages))
        if solved is None:
            # Not the common case (or not well formed): FastAPI reads the same messages and answers.
            await super().handle(scope, _replay(messages, receive), send)
            return
        arguments, inline = solved
        endpoint = self.dependant.call
        assert endpoint is not None
        response = endpoint(**arguments) if inline else await run_in_threadpool(endpoint, **arguments)
        background: BackgroundTasks = arguments["background"]
        if background.tasks and response.background is None:
            response.background = background
        await response(scope, receive, send)


def _json_content(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _arguments(scope: Scope, shortcut: Shortcut, body: bytes) -> tuple[dict[str, Any], bool] | None:
    """The endpoint's arguments as FastAPI would solve them, and whether to call it inline; None where
    FastAPI would answer an error (or might: anything unusual is left to it)."""
    request = Request(scope)
    try:
        await api_key(request)  # the router's dependency
        parsed = shortcut.body_type.model_validate_json(body)
        registry = await get_registry(request)  # what the route's RegistryDep solves
        served = registry.get(shortcut.name)
    except (APIError, ValidationError, UnknownModel):
        return None
    user_id = _header(scope, SHORTCUT_HEADERS["user_id"].encode())
    model_version = _header(scope, SHORTCUT_HEADERS["model_version"].encode())
    if (user_id is not None and len(user_id) > USER_ID_MAX_LENGTH) or (
        model_version is not None and len(model_version) > MODEL_VERSION_MAX_LENGTH
    ):
        return None
    arguments = {"request": request, "body": parsed, "background": BackgroundTasks(), "registry": registry,
                 "user_id": user_id, "model_version": model_version}
    if shortcut.versioned:
        arguments["version"] = scope["path_params"]["version"]
    return arguments, not shortcut.batch and not shortcut.limited and runs_inline(registry, served)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def build_router(
    manifests: dict[str, Manifest], default: str | None, settings: Settings, limiter: Limiter
) -> APIRouter:
    router = APIRouter(
        prefix="/v1", tags=["predict"], dependencies=[ApiKey], responses=ERROR_RESPONSES, route_class=PredictRoute
    )
    # One budget per client across every prediction route.
    limit = shared_limit(limiter, settings, settings.rate_limit_predict, "predict")

    # The default model's routes first: routes are matched in order, and /v1/predict is the busiest.
    for name, manifest in sorted(manifests.items(), key=lambda item: item[0] != default):
        single_body, batch_body = request_models(manifest, settings.max_abs_value, settings.max_batch_size)
        for batch, body_type in ((False, single_body), (True, batch_body)):
            suffix = "/predict/batch" if batch else "/predict"
            paths = [f"/models/{name}{suffix}"] + ([f"{suffix}"] if name == default else [])
            for path in paths:
                _add_route(router, path, name, body_type, limit, settings, batch=batch, versioned=False)
            _add_route(
                router,
                f"/models/{name}/versions/{{version}}{suffix}",
                name,
                body_type,
                limit,
                settings,
                batch=batch,
                versioned=True,
            )
        # KServe's V1 protocol: {"instances": [...]} in, {"predictions": [...]} out, errors {"error": "..."}.
        _add_route(
            router,
            f"/models/{name}:predict",
            name,
            batch_body,
            limit,
            settings,
            batch=True,
            versioned=False,
            kserve=True,
        )

    async def kserve_unknown_model(request: Request, name: str) -> None:
        # Without this, GET /v1/models/{name} would match the path and answer 405.
        try:
            request.app.state.registry.get(name)
        except UnknownModel as exc:
            raise APIError(404, str(exc), code="model_not_found") from None
        raise APIError(
            404,
            f"model {name!r} has no prediction routes: its manifest could not shape them when "
            "the models were loaded; see the log, fix the package and reload",
            code="model_not_found",
        )

    router.add_api_route(
        "/models/{name}:predict",
        kserve_unknown_model,
        methods=["POST"],
        include_in_schema=False,
        route_class_override=APIRoute,
    )
    shape_errors(router.routes[-1:], ErrorShape.PROTOCOL)
    return router


def _single_response(scored: PredictionResult, request_id: str) -> dict[str, Any]:
    probabilities = scored.probability_maps()
    return {
        "model": scored.model.name,
        "version": scored.model.version,
        "prediction": scored.predictions()[0],
        "probabilities": probabilities[0] if probabilities is not None else None,
        "request_id": request_id,
    }


def _batch_response(scored: PredictionResult, request_id: str) -> dict[str, Any]:
    return {
        "model": scored.model.name,
        "version": scored.model.version,
        "predictions": scored.predictions(),
        "probabilities": scored.probability_maps(),
        "request_id": request_id,
    }


def _kserve_response(scored: PredictionResult, request_id: str) -> dict[str, Any]:
    return {"predictions": scored.predictions()}


def _add_route(
    router: APIRouter,
    path: str,
    name: str,
    body_type: type,
    limit: Any,
    settings: Settings,
    *,
    batch: bool,
    versioned: bool,
    kserve: bool = False,
) -> None:
    respond = _kserve_response if kserve else _batch_response if batch else _single_response

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
        rows = body.instances if batch else [body.features]
        scored = _run(request, registry, background, name, rows, batch, user_id, version or model_version)
        return FastJSONResponse(respond(scored, request.state.request_id))

    operation_id = _operation_id("kserve_v1_predict" if kserve else "predict_batch" if batch else "predict", path)
    what = "a batch of instances in one call into the model" if batch else "one instance"
    if kserve:
        what = "instances with KServe's V1 protocol"
    router.add_api_route(
        path,
        limit(route_endpoint(endpoint, operation_id, versioned, body=body_type)),
        methods=["POST"],
        response_model=KServePrediction if kserve else BatchPrediction if batch else Prediction,
        responses=PROTOCOL_ERROR_RESPONSES if kserve else None,
        summary=f"Predict {what} with model {name!r}" + (" at a given version" if versioned else ""),
        operation_id=operation_id,
    )
    route = router.routes[-1]
    assert isinstance(route, PredictRoute)
    if kserve:
        shape_errors([route], ErrorShape.PROTOCOL)
    shortcut = Shortcut(name, body_type, batch, versioned, limited=settings.rate_limit_enabled)
    _check_shortcut(route, shortcut)
    route.shortcut = shortcut


def _check_shortcut(route: APIRoute, shortcut: Shortcut) -> None:
    """Refuse to build a prediction route whose dependencies the shortcut would skip or solve otherwise than
    FastAPI does: a dependency added to the router, a parameter added to the endpoint, a header renamed."""
    dependant = route.dependant
    problems = []
    expected = SHORTCUT_PARAMETERS | ({"version"} if shortcut.versioned else set())
    fields = [*dependant.path_params, *dependant.query_params, *dependant.header_params, *dependant.cookie_params,
              *dependant.body_params]
    named = {field.name for field in fields} | {sub.name for sub in dependant.dependencies if sub.name}
    named |= {name for name in (dependant.request_param_name, dependant.background_tasks_param_name,
                                dependant.response_param_name, dependant.http_connection_param_name,
                                dependant.security_scopes_param_name) if name}
    if named != expected:
        problems.append(f"the endpoint takes {sorted(named)}, the shortcut supplies {sorted(expected)}")
    headers = {field.name: field.alias.lower() for field in dependant.header_params}
    if headers != SHORTCUT_HEADERS:
        problems.append(f"the endpoint reads the headers {headers}, the shortcut {SHORTCUT_HEADERS}")
    solved = {sub.name: sub.call for sub in dependant.dependencies if sub.name}
    if solved != SHORTCUT_DEPENDENCIES:
        problems.append(f"the endpoint's dependencies are {solved}, the shortcut solves {SHORTCUT_DEPENDENCIES}")
    # The shortcut validates the whole body as the route's body model: FastAPI must read it so (not embedded
    # under the parameter's name, not as another type).
    read_as = route.body_field.field_info.annotation if route.body_field is not None else None
    if read_as is not shortcut.body_type:
        problems.append(f"FastAPI reads the body as {getattr(read_as, '__name__', read_as)}, the shortcut as "
                        f"{shortcut.body_type.__name__}")
    unnamed = tuple(sub.call for sub in dependant.dependencies if not sub.name)
    if unnamed != ROUTER_DEPENDENCIES:
        problems.append(f"the router's dependencies are {unnamed}, the shortcut checks {ROUTER_DEPENDENCIES}")
    if problems:
        raise RuntimeError(
            f"route POST {route.path}: the prediction shortcut no longer matches it: " + "; ".join(problems)
            + ". Make _arguments in app/api/predict.py solve the same (and the constants above it say so)."
        )


def _operation_id(kind: str, path: str) -> str:
    return kind + "_" + "".join(ch if ch.isalnum() else "_" for ch in path).strip("_")
