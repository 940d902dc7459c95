"""Open Inference Protocol v2 (REST), so KServe, MLServer and Triton clients work unchanged.

Inputs come either as one numeric tensor of shape [n, n_features] in manifest
order (for a model whose features are all numbers), or as one tensor per
feature named after it (shape [n] or [n, 1]; ``BYTES`` for a string feature),
which is what MLServer's pandas codec sends. ``decode`` only takes the tensors
apart: app/validation.py checks the values and builds the estimator's input,
with the manifest of the version that scores the request. Outputs follow
MLServer's scikit-learn runtime: ``predict`` (labels or values) and, for
classifiers, ``predict_proba`` ([n, n_classes], class order in parameters).
Errors are ``{"error": "..."}`` as the protocol asks.
"""

import functools
import math
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import BaseModel, ConfigDict, Field
from slowapi import Limiter

from app import __version__
from app.deps import ApiKey, RegistryDep
from app.errors import APIError
from app.inference import score, shadow_score
from app.packaging import LoadedModel
from app.validation import Batch, ValidationFailure
from app.registry import ModelRegistry, ServedModel, UnknownModel
from app.responses import FastJSONResponse
from app.routes.health import readiness
from app.security import shared_limit
from app.settings import Settings

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class V2Error(BaseModel):
    error: str


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    shape: list[int] = Field(min_length=1, max_length=2)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}],
                }
            ]
        },
    )
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1024)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2Error, "description": "Invalid inference request."},
    401: {"model": V2Error, "description": "API key missing."},
    403: {"model": V2Error, "description": "API key not accepted, or a version that takes no traffic."},
    404: {"model": V2Error, "description": "Unknown model or version."},
    413: {"model": V2Error, "description": "More rows than MLAPI_MAX_BATCH_SIZE, or a body over the limit."},
    429: {"model": V2Error, "description": "Rate limit exceeded."},
}


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _only_numbers(data: list[Any]) -> bool:
    """JSON numbers only, at any nesting: numpy would read "5.1" and true as 5.1 and 1.0."""
    pending = [data]
    while pending:
        for value in pending.pop():
            if isinstance(value, list):
                pending.append(value)
            elif type(value) not in (int, float):
                return False
    return True


def _count_values(data: list[Any]) -> int:
    """Values in ``data`` at any nesting; a flat list (the protocol's form) is counted without a walk."""
    if not any(isinstance(value, list) for value in data[:1]):
        return len(data)
    count, pending = 0, [data]
    while pending:
        for value in pending.pop():
            if isinstance(value, list):
                pending.append(value)
            else:
                count += 1
    return count


def _declared_rows(tensors: list[RequestInput], names: list[str]) -> int:
    """The rows the request declares, from the shapes alone; 400 for a shape that cannot fit the model."""
    k = len(names)
    for t in tensors:
        if any(d < 0 for d in t.shape):
            raise _bad(f"input {t.name!r}: shape {t.shape} has a negative dimension; give the row and column counts")
    if len(tensors) == 1 and tensors[0].name not in names:
        t = tensors[0]
        shape = t.shape if len(t.shape) == 2 else [1, t.shape[0]]
        if shape[1] != k:
            raise _bad(f"input {t.name!r}: expected shape [n, {k}] with features in the order {names}, got {t.shape}")
        return shape[0]
    by_name = {t.name: t for t in tensors}
    unknown = sorted(set(by_name) - set(names))
    missing = [n for n in names if n not in by_name]
    if unknown or missing:
        raise _bad(
            f"inputs must be one [n, {k}] tensor or one tensor per feature {names}; "
            f"unknown: {unknown}, missing: {missing}"
        )
    for t in tensors:
        if len(t.shape) == 2 and t.shape[1] != 1:
            raise _bad(f"input {t.name!r}: a tensor for one feature has shape [n] or [n, 1], got {t.shape}")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise _bad(f"every feature tensor must hold the same number of rows; got shapes {sorted(rows)}")
    return rows.pop()


def _flat(data: list[Any]) -> list[Any]:
    """The values of a tensor in row-major order (the protocol's flat form, or nested lists)."""
    if not any(isinstance(value, list) for value in data[:1]):
        return data
    out: list[Any] = []
    pending = [iter(data)]
    while pending:
        for value in pending[-1]:
            if isinstance(value, list):
                pending.append(iter(value))
                break
            out.append(value)
        else:
            pending.pop()
    return out


def _refused(exc: ValidationFailure, single_tensor: str | None) -> APIError:
    """The core's first problem, located by input (and feature for one tensor of all features)."""
    first = exc.details[0]
    loc = first["loc"]
    if len(loc) > 1:
        where = (f"input {single_tensor!r} row {loc[0]}, feature {loc[1]!r}" if single_tensor
                 else f"input {loc[1]!r} row {loc[0]}")
    else:
        where = "inputs"
    more = len(exc.details) - 1
    return _bad(f"{where}: {first['msg']}" + (f" (and {more} more problems)" if more else ""))


def decode(body: InferenceRequest, model: LoadedModel, max_abs: float, max_rows: int) -> Batch:
    """The inputs of a request as the estimator input of ``model``; APIError 400/413 for what does not fit."""
    schema = model.inputs
    names = model.feature_names
    k = len(names)
    tensors = body.inputs
    # The declared shapes are checked before the data is read or converted: a body of millions of
    # values over the row limit costs no walk over them and no float64 copy.
    rows = _declared_rows(tensors, names)
    if rows > max_rows:
        raise APIError(413, f"{rows} rows is more than the limit of {max_rows} per request; split the request")
    if rows == 0:
        raise _bad("no rows to score")
    for t in tensors:
        needed = math.prod(t.shape)
        count = _count_values(t.data)
        if count != needed:
            raise _bad(f"input {t.name!r}: shape {t.shape} needs {needed} values, got {count}")
        if t.datatype not in ("BYTES", "BOOL") and not _only_numbers(t.data):
            raise _bad(f"input {t.name!r}: data must be numbers (JSON numbers, not strings, booleans or null)")
    single = tensors[0].name if len(tensors) == 1 and tensors[0].name not in names else None
    try:
        if single is not None:
            t = tensors[0]
            if not schema.numeric or t.datatype in ("BYTES", "BOOL"):
                raise _bad(
                    f"input {t.name!r}: one [n, {k}] tensor takes numbers only; this model takes "
                    f"{[f'{f.name} ({f.type})' for f in schema.features]}: send one input per feature, named after it"
                )
            try:
                X = np.asarray(t.data, dtype=np.float64).reshape(rows, k)
            except OverflowError:  # an integer literal beyond float64 (JSON allows any length)
                raise _bad("input data must lie within the range of a 64-bit float") from None
            return schema.matrix(X, max_abs)
        by_name = {t.name: t for t in tensors}
        return schema.columns([_flat(by_name[n].data) for n in names], max_abs)
    except ValidationFailure as exc:
        raise _refused(exc, single) from None


def _datatype(values: np.ndarray) -> str:
    if values.dtype.kind in "fc":
        return "FP64"
    if values.dtype.kind in "iu":
        return "INT64"
    if values.dtype.kind == "b":
        return "BOOL"
    return "BYTES"


_TENSOR_TYPES = {"float": "FP64", "int": "INT64", "bool": "BOOL", "string": "BYTES"}


def _metadata_inputs(model: LoadedModel) -> list[dict[str, Any]]:
    k = len(model.feature_names)
    if model.inputs.numeric:
        return [{"name": "input-0", "datatype": "FP64", "shape": [-1, k], "parameters": {"features": model.feature_names}}]
    return [{"name": f.name, "datatype": _TENSOR_TYPES[f.type], "shape": [-1, 1]} for f in model.manifest.features]


def _model_metadata(served: ServedModel, model: LoadedModel) -> dict[str, Any]:
    outputs = [{"name": "predict", "datatype": "BYTES" if model.task == "classifier" else "FP64", "shape": [-1]}]
    if model.task == "classifier":
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(model.classes or [])]})
    return {
        "name": served.name,
        "versions": sorted(served.versions),
        "platform": "onnxruntime" if model.engine.name == "onnx" else "sklearn",
        "inputs": _metadata_inputs(model),
        "outputs": outputs,
        "parameters": {"version": model.version, "classes": model.classes, "engine": model.engine.name},
    }


def _renamed(func: Any, name: str) -> Any:
    @functools.wraps(func)
    def endpoint(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    endpoint.__name__ = endpoint.__qualname__ = name
    return endpoint


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    predict_limit = shared_limit(limiter, settings, settings.rate_limit_predict, "predict")
    api_limit = shared_limit(limiter, settings, settings.rate_limit_default, "api")

    def lookup(registry: ModelRegistry, name: str, version: str | None) -> tuple[ServedModel, LoadedModel]:
        try:
            served = registry.get(name)
            return served, served.choose(
                override=version or served.default_version, overrides=settings.version_override
            )
        except UnknownModel as exc:
            raise APIError(404, str(exc)) from None

    @router.get("", summary="Server metadata")
    def server_metadata() -> dict[str, Any]:
        return {"name": "mlapi", "version": __version__, "extensions": []}

    @router.get("/health/live", summary="Server liveness")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @router.get("/health/ready", summary="Server readiness (503 when not ready)")
    def ready(request: Request) -> FastJSONResponse:
        ok, reasons = readiness(request)
        if not ok:
            return FastJSONResponse({"ready": False, "error": "; ".join(reasons)}, status_code=503)
        return FastJSONResponse({"ready": True})

    def metadata(request: Request, registry: RegistryDep, name: str, version: str | None = None) -> FastJSONResponse:
        served, model = lookup(registry, name, version)
        return FastJSONResponse(_model_metadata(served, model))

    def model_ready(request: Request, registry: RegistryDep, name: str, version: str | None = None) -> FastJSONResponse:
        lookup(registry, name, version)
        return FastJSONResponse({"name": name, "ready": True})

    def infer(
        request: Request,
        body: InferenceRequest,
        background: BackgroundTasks,
        registry: RegistryDep,
        name: str,
        version: str | None = None,
    ) -> FastJSONResponse:
        # The version is checked before the body: a refused version costs no decoding.
        served, _ = lookup(registry, name, version)
        user = request.headers.get("x-user-id")

        def decoded(model: LoadedModel) -> Batch:
            return decode(body, model, settings.max_abs_value, settings.max_batch_size)

        scored = score(registry, served, decoded, user_id=user, version=version, state=request.state)
        request.app.state.prediction_log.write(request.state, scored)
        if served.shadow is not None:
            background.add_task(shadow_score, served, scored, request.state.request_id)
        n = len(scored.batch)
        outputs = [
            {"name": "predict", "shape": [n], "datatype": _datatype(scored.labels), "data": scored.labels.tolist()}
        ]
        if scored.probabilities is not None:
            outputs.append(
                {
                    "name": "predict_proba",
                    "shape": list(scored.probabilities.shape),
                    "datatype": "FP64",
                    "parameters": {"classes": scored.model.classes},
                    "data": scored.probabilities.reshape(-1).tolist(),
                }
            )
        if body.outputs:
            wanted = {o.name for o in body.outputs}
            unknown = wanted - {o["name"] for o in outputs}
            if unknown:
                raise _bad(f"unknown outputs {sorted(unknown)}; available: {[o['name'] for o in outputs]}")
            outputs = [o for o in outputs if o["name"] in wanted]
        return FastJSONResponse(
            {
                "model_name": name,
                "model_version": scored.model.version,
                "id": body.id if body.id is not None else request.state.request_id,
                "outputs": outputs,
            }
        )

    deps = [ApiKey]
    for suffix in ("", "/versions/{version}"):
        tag = "_versioned" if suffix else ""
        for kind, endpoint, method, limit, extra in (
            ("metadata", metadata, "GET", api_limit, {}),
            ("ready", model_ready, "GET", api_limit, {}),
            ("infer", infer, "POST", predict_limit, {"response_model": InferenceResponse}),
        ):
            operation_id = f"v2_model_{kind}{tag}"
            # A distinct function per route: slowapi files limits by function name.
            route_endpoint = _renamed(endpoint, operation_id)
            router.add_api_route(
                f"/models/{{name}}{suffix}" + ("" if kind == "metadata" else f"/{kind}"),
                limit(route_endpoint),
                methods=[method],
                dependencies=deps,
                responses=V2_ERRORS,
                summary={"metadata": "Model metadata", "ready": "Model readiness", "infer": "Inference"}[kind],
                operation_id=operation_id,
                **extra,
            )
    return router
