"""Open Inference Protocol v2 (REST), so KServe, MLServer and Triton clients work unchanged.

Inputs come either as one numeric tensor of shape [n, n_features] in manifest
order (for a model whose features are all numbers), or as one tensor per
feature named after it (shape [n] or [n, 1]; ``BYTES`` for a string feature),
which is what MLServer's pandas codec sends; as JSON or as binary tensor data
(app/api/tensors.py), in a body that may be gzip or deflate compressed and may carry
any Content-Type (tritonclient sends none). ``decode`` only takes the tensors
apart: app/packages/validation.py checks the values and builds the estimator's input,
with the manifest of the version that scores the request. Outputs follow
MLServer's scikit-learn runtime: ``predict`` alone unless outputs are requested
(labels or values, shape [n, 1]), ``predict_proba`` on request for classifiers
([n, n_classes], class order in parameters), each as JSON or binary data, and
the classification extension's top classes. Errors are ``{"error": "..."}`` as
the protocol asks.
"""

import collections
import math
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from slowapi import Limiter
from starlette.responses import Response

from app import __version__
from app.api import tensors
from app.api.deps import ApiKey, RegistryDep, route_endpoint
from app.api.health import readiness
from app.api.schemas import ProtocolError
from app.api.security import shared_limit
from app.errors import APIError, ErrorShape, shape_errors
from app.packages.gate import ModelVersion
from app.packages.validation import Batch, ValidationFailure
from app.responses import FastJSONResponse
from app.serving.inference import PredictionResult, compare_shadow, predict
from app.serving.registry import ModelRegistry, ServedModel, UnknownModel
from app.settings import Settings

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    shape: list[int] = Field(min_length=1, max_length=2)
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes after the JSON header (binary tensor data)."
    )
    data: list[Any] | None = Field(None, description="The values, row major; absent when sent as binary data.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: true for binary tensor data; classification: k for the top k classes."
    )


class InferenceRequest(BaseModel):
    # Other top-level fields are ignored, as the protocol allows: the KServe SDK always sends model_name.
    model_config = ConfigDict(
        extra="ignore",
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
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: true for every output as binary tensor data."
    )
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
    400: {"model": ProtocolError, "description": "Invalid inference request."},
    401: {"model": ProtocolError, "description": "API key missing."},
    403: {"model": ProtocolError, "description": "API key not accepted, or a version that takes no traffic."},
    404: {"model": ProtocolError, "description": "Unknown model or version."},
    413: {"model": ProtocolError, "description": "More rows than MLAPI_MAX_BATCH_SIZE, or a body over the limit."},
    415: {"model": ProtocolError, "description": "A Content-Encoding other than gzip or deflate."},
    422: {
        "model": ProtocolError,
        "description": "The body does not match the protocol's schema; the message names the field.",
    },
    429: {"model": ProtocolError, "description": "Rate limit exceeded; see Retry-After."},
    503: {"model": ProtocolError, "description": "Not ready: no model loaded or the rate-limit store is down."},
}


# With binary outputs the answer is the JSON header, then the tensors (app/api/tensors.py).
BINARY_RESPONSE: dict[str, Any] = {
    "description": "The outputs as JSON; with binary_data outputs, the JSON header of "
    "Inference-Header-Content-Length bytes followed by the binary tensor data.",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
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
    sent = collections.Counter(t.name for t in tensors)
    twice = sorted(name for name, count in sent.items() if count > 1)
    if twice:
        # With two tensors of one name, which one is scored would be a guess.
        raise _bad(f"inputs {twice} are sent more than once; send each input once")
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
        where = (
            f"input {single_tensor!r} row {loc[0]}, feature {loc[1]!r}"
            if single_tensor
            else f"input {loc[1]!r} row {loc[0]}"
        )
    else:
        where = "inputs"
    more = len(exc.details) - 1
    return _bad(f"{where}: {first['msg']}" + (f" (and {more} more problems)" if more else ""))


def decode(body: InferenceRequest, model: ModelVersion, max_abs: float, max_rows: int) -> Batch:
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
        count = _count_values(t.data or [])
        if count != needed:
            raise _bad(f"input {t.name!r}: shape {t.shape} needs {needed} values, got {count}")
        if t.datatype not in ("BYTES", "BOOL") and not _only_numbers(t.data or []):
            raise _bad(f"input {t.name!r}: data must be numbers (JSON numbers, not strings, booleans or null)")
    single = tensors[0].name if len(tensors) == 1 and tensors[0].name not in names else None
    try:
        if single is not None:
            t = tensors[0]
            if schema.numeric and t.datatype in ("BYTES", "BOOL"):
                # The model takes numbers only: the datatype is the mistake, not the tensor's layout.
                raise _bad(
                    f"input {t.name!r} must be numbers (FP64, FP32 or an integer datatype), not {t.datatype}: "
                    f"this model's features {list(names)} are all numbers"
                )
            if not schema.numeric:
                raise _bad(
                    f"input {t.name!r}: one [n, {k}] tensor takes numbers only; this model takes "
                    f"{[f'{f.name} ({f.type})' for f in schema.features]}: send one input per feature, named after it"
                )
            try:
                X = np.asarray(t.data, dtype=np.float64).reshape(rows, k)
            except OverflowError:  # an integer literal beyond float64 (JSON allows any length)
                raise _bad("input data must lie within the range of a 64-bit float") from None
            except ValueError:  # ragged nesting: numpy cannot make one array of it
                raise _bad(
                    f"input {t.name!r}: data must be a flat list of {rows * k} numbers, or lists nested as shape "
                    f"{t.shape}"
                ) from None
            return schema.matrix(X, max_abs)
        by_name = {t.name: t for t in tensors}
        return schema.columns([_flat(by_name[n].data or []) for n in names], max_abs)
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


def _triton_type(datatype: str) -> str:
    """A datatype as Triton's model configuration names it (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


_TENSOR_TYPES = {"float": "FP64", "int": "INT64", "bool": "BOOL", "string": "BYTES"}


def _metadata_inputs(model: ModelVersion) -> list[dict[str, Any]]:
    k = len(model.feature_names)
    if model.inputs.numeric:
        return [
            {"name": "input-0", "datatype": "FP64", "shape": [-1, k], "parameters": {"features": model.feature_names}}
        ]
    return [{"name": f.name, "datatype": _TENSOR_TYPES[f.type], "shape": [-1, 1]} for f in model.manifest.features]


def _model_metadata(served: ServedModel, model: ModelVersion) -> dict[str, Any]:
    outputs = [{"name": "predict", "datatype": "BYTES" if model.task == "classifier" else "FP64", "shape": [-1, 1]}]
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


def _model_config(served: ServedModel, model: ModelVersion, max_batch_size: int) -> dict[str, Any]:
    """The model configuration extension's answer, in Triton's form, from what the manifest knows."""
    metadata = _model_metadata(served, model)
    return {
        "name": served.name,
        "platform": metadata["platform"],
        "backend": metadata["platform"],
        "version_policy": {"specific": {"versions": metadata["versions"]}},
        "max_batch_size": max_batch_size,
        "input": [
            {"name": t["name"], "data_type": _triton_type(t["datatype"]), "dims": t["shape"][1:]}
            for t in metadata["inputs"]
        ],
        "output": [
            {"name": t["name"], "data_type": _triton_type(t["datatype"]), "dims": t["shape"][1:]}
            for t in metadata["outputs"]
        ],
        "parameters": {
            "version": model.version,
            "task": model.task,
            "features": [{"name": f.name, "type": f.type} for f in model.manifest.features],
            "classes": model.classes,
            "engine": model.engine.name,
        },
    }


def _with_binary_inputs(body: InferenceRequest, binary: bytes) -> list[RequestInput]:
    """The inputs with the values of those sent as binary tensor data read into ``data``."""
    inputs, offset = [], 0
    for t in body.inputs:
        size = tensors.binary_size(t.parameters)
        if size is None:
            if t.data is None:
                raise _bad(f"input {t.name!r} has no data; give data, or binary_data_size and the binary data")
            inputs.append(t)
            continue
        if t.data is not None:
            raise _bad(f"input {t.name!r} has both data and binary_data_size; send its values one way")
        if offset + size > len(binary):
            raise _bad(
                f"input {t.name!r}: binary_data_size is {size} but only {len(binary) - offset} bytes of binary "
                "data are left after the JSON header (Inference-Header-Content-Length)"
            )
        values = tensors.read_binary(t.name, t.datatype, t.shape, binary[offset : offset + size])
        offset += size
        inputs.append(t.model_copy(update={"data": values}))
    if offset != len(binary):
        raise _bad(
            f"{len(binary) - offset} bytes follow the JSON header that no input's binary_data_size accounts for"
            + ("" if binary[:offset] else "; without binary inputs, leave out Inference-Header-Content-Length")
        )
    return inputs


def _top_classes(probabilities: np.ndarray, classes: list[Any], k: int) -> np.ndarray:
    """The classification extension: per row the k likeliest classes as "probability:index:label"."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return np.array(
        [[f"{row[j]:f}:{j}:{classes[j]}" for j in top] for row, top in zip(probabilities, order, strict=True)],
        dtype=object,
    )


def _output_names(model: ModelVersion) -> list[str]:
    return ["predict", "predict_proba"] if model.task == "classifier" else ["predict"]


def _requested_outputs(body: InferenceRequest, available: list[str]) -> list[tuple[str, int, bool]]:
    """(name, top classes or 0, binary?) per output, as MLServer's scikit-learn runtime selects them:
    ``predict`` alone unless outputs are named; an unknown name (predict_proba of a regressor) is a 400."""
    binary_default = (body.parameters or {}).get("binary_data_output", False)
    requested = []
    for output in body.outputs or [RequestOutput(name="predict")]:
        if output.name not in available:
            raise _bad(f"unknown output {output.name!r}; this model gives {available}")
        wanted = output.parameters or {}
        binary = wanted.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise _bad(f"output {output.name!r}: binary_data must be true or false, got {binary!r}")
        k = wanted.get("classification", 0)
        if type(k) is not int or k < 0:
            raise _bad(f"output {output.name!r}: classification must be a whole number of classes, got {k!r}")
        if k and output.name != "predict_proba":
            raise _bad(
                f"output {output.name!r}: the classification extension ranks the classes of predict_proba; "
                "ask for predict_proba with classification"
            )
        requested.append((output.name, k, binary))
    return requested


def _outputs(
    scored: PredictionResult, requested: list[tuple[str, int, bool]]
) -> list[tuple[dict[str, Any], np.ndarray, bool]]:
    """(output without its data, values, binary?) per requested output."""
    n = scored.labels.shape[0]
    outputs = []
    for name, k, binary in requested:
        parameters: dict[str, Any]
        if name == "predict":
            values, parameters = scored.labels.reshape(n, 1), {"content_type": "np"}
        else:
            assert scored.probabilities is not None
            values, parameters = scored.probabilities, {"content_type": "np", "classes": scored.model.classes}
            if k:
                values, parameters = _top_classes(values, scored.model.classes or [], min(k, values.shape[1])), {}
        entry = {"name": name, "shape": list(values.shape), "datatype": _datatype(values), "parameters": parameters}
        outputs.append((entry, values, binary))
    return outputs


def _infer_response(
    request: Request, payload: dict[str, Any], outputs: list[tuple[dict[str, Any], np.ndarray, bool]]
) -> Response:
    """JSON, or JSON and then binary tensor data; compressed when the client accepts it."""
    chunks = []
    for entry, values, binary in outputs:
        if binary:
            chunk = tensors.to_binary(values, entry["datatype"])
            entry["parameters"] = {**entry["parameters"], "binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = values.reshape(-1).tolist()
        if not entry["parameters"]:
            del entry["parameters"]
    payload["outputs"] = [entry for entry, _, _ in outputs]
    content = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    headers = {"vary": "Accept-Encoding"}
    media_type = "application/json"
    if chunks:
        headers[tensors.HEADER_LENGTH] = str(len(content))
        media_type = "application/octet-stream"
        content = b"".join([content, *chunks])
    coding = tensors.response_encoding(request.headers.get("accept-encoding"))
    if coding is not None:
        content = tensors.compress(content, coding)
        headers["content-encoding"] = coding
    return Response(content, media_type=media_type, headers=headers)


class InferRoute(APIRoute):
    """An infer route reads the body as real clients send it before FastAPI parses the JSON: with any
    Content-Type or none, gzip or deflate compressed, the JSON header followed by binary tensor data."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            limit = request.app.state.settings.max_body_bytes
            raw = await request.body()  # the middleware's limit holds for the body as sent
            body = tensors.decompress(raw, request.headers.get("content-encoding"), limit)
            header, binary = tensors.split_body(body, request.headers.get(tensors.HEADER_LENGTH))
            request.state.binary_tensor_data = binary
            scope = dict(request.scope)
            scope["headers"] = [
                (k, v)
                for k, v in request.scope["headers"]
                if k not in (b"content-type", b"content-encoding", b"content-length")
            ] + [(b"content-type", b"application/json")]
            parsed = Request(scope, request.receive)
            parsed._body = header
            return await handler(parsed)

        return route


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    predict_limit = shared_limit(limiter, settings, settings.rate_limit_predict, "predict")
    api_limit = shared_limit(limiter, settings, settings.rate_limit_default, "api")

    def lookup(registry: ModelRegistry, name: str, version: str | None) -> tuple[ServedModel, ModelVersion]:
        try:
            served = registry.get(name)
            return served, served.choose(
                override=version or served.default_version, overrides=settings.version_override
            )
        except UnknownModel as exc:
            raise APIError(404, str(exc)) from None

    @router.get("", summary="Server metadata")
    def server_metadata() -> dict[str, Any]:
        return {"name": "mlapi", "version": __version__, "extensions": tensors.EXTENSIONS}

    @router.get("/health/live", summary="Server liveness")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @router.get("/health/ready", summary="Server readiness (503 when not ready)", responses={503: V2_ERRORS[503]})
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

    def config(request: Request, registry: RegistryDep, name: str, version: str | None = None) -> FastJSONResponse:
        served, model = lookup(registry, name, version)
        return FastJSONResponse(_model_config(served, model, settings.max_batch_size))

    def infer(
        request: Request,
        body: InferenceRequest,
        background: BackgroundTasks,
        registry: RegistryDep,
        name: str,
        version: str | None = None,
    ) -> Response:
        # The version is checked before the body: a refused version costs no decoding.
        served, reference = lookup(registry, name, version)
        request_body = body.model_copy(
            update={"inputs": _with_binary_inputs(body, getattr(request.state, "binary_tensor_data", b""))}
        )
        # Outputs are checked before scoring: a request the model cannot answer costs no inference.
        requested = _requested_outputs(body, _output_names(reference))
        user = request.headers.get("x-user-id")

        def decoded(model: ModelVersion) -> Batch:
            return decode(request_body, model, settings.max_abs_value, settings.max_batch_size)

        scored = predict(registry, served, decoded, user_id=user, version=version, state=request.state)
        request.app.state.prediction_log.write(request.state, scored)
        if served.shadow is not None:
            background.add_task(compare_shadow, served, scored, request.state.request_id)
        outputs = _outputs(scored, requested)
        payload = {
            "model_name": name,
            "model_version": scored.model.version,
            "id": body.id if body.id is not None else request.state.request_id,
        }
        return _infer_response(request, payload, outputs)

    deps = [ApiKey]
    summaries = {
        "metadata": "Model metadata",
        "ready": "Model readiness",
        "config": "Model configuration",
        "infer": "Inference",
    }
    for suffix in ("", "/versions/{version}"):
        tag = "_versioned" if suffix else ""
        routes: tuple[tuple[str, Any, str, Any, dict[str, Any]], ...] = (
            ("metadata", metadata, "GET", api_limit, {}),
            ("ready", model_ready, "GET", api_limit, {}),
            ("config", config, "GET", api_limit, {}),
            (
                "infer",
                infer,
                "POST",
                predict_limit,
                {
                    "response_model": InferenceResponse,
                    "route_class_override": InferRoute,
                    "responses": {**V2_ERRORS, 200: BINARY_RESPONSE},
                    "description": "The body is JSON with any Content-Type or none, optionally gzip or deflate "
                    "(Content-Encoding), or the binary tensor data extension's JSON header of "
                    "Inference-Header-Content-Length bytes followed by the tensors. Outputs: predict alone "
                    "unless outputs names predict_proba too.",
                },
            ),
        )
        for kind, endpoint, method, limit, extra in routes:
            operation_id = f"v2_model_{kind}{tag}"
            routed = route_endpoint(endpoint, operation_id, versioned=bool(suffix))
            router.add_api_route(
                f"/models/{{name}}{suffix}" + ("" if kind == "metadata" else f"/{kind}"),
                limit(routed),
                methods=[method],
                dependencies=deps,
                summary=summaries[kind],
                operation_id=operation_id,
                **({"responses": V2_ERRORS} | extra),
            )
    shape_errors(router.routes, ErrorShape.PROTOCOL)
    return router
