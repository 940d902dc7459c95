"""The gRPC Open Inference Protocol (``inference.GRPCInferenceService``), served by every worker.

Each worker that has ``MLAPI_GRPC_BIND`` set starts a gRPC server on its own event loop, on that
address (``SO_REUSEPORT``: the kernel spreads connections over the workers, as for HTTP). An RPC is
not served by code of its own: it becomes the REST call of the same meaning, which runs through the
same app as an HTTP request (the middleware, the API key, the rate limits, the /v2 routes, inference,
the prediction log, the access log and the metrics), and the answer is turned back into the RPC's.
So both transports check, score and count a request the same way. A ModelInfer's tensors go to
``POST /v2/models/{name}[/versions/{v}]/infer`` as binary tensor data (app/api/tensors.py), whether
they came as ``raw_input_contents`` or as typed ``contents``, and its outputs come back binary: as
``raw_output_contents`` when the request sent raw inputs (what tritonclient does), else as typed
``contents`` (what MLServer's clients read).

Metadata is the request's headers: ``x-api-key``, ``x-request-id``, ``x-user-id``,
``x-model-version``. The REST status becomes the gRPC status (400 INVALID_ARGUMENT, 401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 413 and 429 RESOURCE_EXHAUSTED, 503
UNAVAILABLE) with the REST error's message as details; ``x-request-id`` is returned in the initial
metadata and ``retry-after`` in the trailing metadata of a refusal. The peer's address is the
client's, rewritten from ``x-forwarded-for`` only when the peer is one of ``MLAPI_TRUSTED_PROXIES``
(NGINX's grpc_pass), with uvicorn's own proxy-headers middleware, as for HTTP.

The generated message modules register the protocol's names (``inference.ModelInferRequest``, ...) in
protobuf's default pool, as tritonclient.grpc's modules do: one process imports one or the other, which is
why only the workers import this module and the tests use client libraries in their own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import grpc
import numpy as np
from grpc import aio
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.api import tensors
from app.logs import get_logger
from app.rpc import grpc_predict_v2_pb2 as pb
from app.rpc import grpc_predict_v2_pb2_grpc as pb_grpc
from app.settings import Settings

log = get_logger("grpc")

SERVICE = "inference.GRPCInferenceService"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Metadata that is gRPC's own, not a header of the request it stands for.
# The ones the servicer sets itself (the body's form) are not taken from the client either.
_NOT_HEADERS = {"content-type", "content-length", "te", "user-agent", "accept-encoding", "host", "content-encoding",
                tensors.HEADER_LENGTH}
# The typed contents field of each datatype (FP16 has none: the protocol sends it raw only).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_CONTENT_FIELDS = sorted(set(_CONTENTS.values()))


class Refused(Exception):
    """An RPC answered with an error status instead of its response."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = tuple(trailers)


class Answer:
    """The REST answer an RPC was turned into."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}

    def refused(self) -> Refused:
        """The error status of a non-2xx answer, with the REST error's message."""
        try:
            message = str(self.json().get("error") or self.json().get("message") or self.body[:500])
        except (ValueError, AttributeError):
            message = self.body[:500].decode("utf-8", "replace")
        code = _CODES.get(self.status, grpc.StatusCode.INTERNAL if self.status >= 500 else grpc.StatusCode.UNKNOWN)
        trailers = [("retry-after", self.headers["retry-after"])] if "retry-after" in self.headers else []
        return Refused(code, message, trailers)


def _parameter(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    return pb.InferParameter(string_param=json.dumps(value))  # the protocol's parameters hold scalars only


def _value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _parameters(entries: Any) -> dict[str, Any]:
    return {key: _value(entries[key]) for key in entries}


def _raw_from_contents(tensor: Any) -> bytes:
    """An input's typed contents in the binary form of its datatype."""
    datatype = tensor.datatype
    field = _CONTENTS.get(datatype)
    used = [name for name in _CONTENT_FIELDS if len(getattr(tensor.contents, name))]
    if field is None:
        if datatype == "FP16":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input {tensor.name!r}: FP16 values have no contents field; send them in raw_input_contents")
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"input {tensor.name!r}: unknown datatype {datatype!r}; use one of {sorted(_CONTENTS)}")
    if any(name != field for name in used):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"input {tensor.name!r} is {datatype}, whose values go in contents.{field}, but they are in "
                      f"contents.{', '.join(used)}")
    values = list(getattr(tensor.contents, field))
    if datatype == "BYTES":
        return tensors.to_binary(np.array(values, dtype=object), "BYTES")
    dtype = np.dtype(tensors.NUMPY_TYPES[datatype])
    if dtype.kind in "iu" and values:
        # int_contents and uint_contents are 32-bit: an INT8 of 300 would wrap to 44 in the cast.
        limits = np.iinfo(dtype)
        if min(values) < limits.min or max(values) > limits.max:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input {tensor.name!r}: a value lies outside the range of {datatype} "
                          f"({limits.min} to {limits.max})")
    return tensors.to_binary(np.array(values, dtype=dtype), datatype)


def infer_body(request: Any) -> tuple[bytes, int, bool]:
    """The REST form of a ModelInferRequest: (JSON header + binary tensor data, header length, raw?)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                      "give one per input, in the order of inputs")
    inputs, chunks = [], []
    for i, tensor in enumerate(request.inputs):
        if raw:
            # MLServer's converter sends an empty contents beside raw_input_contents: only values count.
            if any(len(getattr(tensor.contents, name)) for name in _CONTENT_FIELDS):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input {tensor.name!r} has contents while raw_input_contents is used; "
                              "send every input one way")
            chunk = raw[i]
        else:
            chunk = _raw_from_contents(tensor)
        chunks.append(chunk)
        inputs.append({
            "name": tensor.name,
            "shape": list(tensor.shape),
            "datatype": tensor.datatype,
            "parameters": {**_parameters(tensor.parameters), "binary_data_size": len(chunk)},
        })
    header: dict[str, Any] = {"inputs": inputs, "parameters": {**_parameters(request.parameters),
                                                              "binary_data_output": True}}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {**_parameters(o.parameters), "binary_data": True}} for o in request.outputs
        ]
    encoded = json.dumps(header).encode()
    return b"".join([encoded, *chunks]), len(encoded), bool(raw)


def infer_response(answer: Answer, raw: bool) -> Any:
    """A ModelInferResponse from the REST answer's JSON header and binary outputs."""
    length = int(answer.headers.get(tensors.HEADER_LENGTH, len(answer.body)))
    payload = json.loads(answer.body[:length])
    binary = answer.body[length:]
    response = pb.ModelInferResponse(
        model_name=payload["model_name"], model_version=payload.get("model_version") or "", id=payload.get("id") or ""
    )
    offset = 0
    for entry in payload["outputs"]:
        parameters = dict(entry.get("parameters") or {})
        size = parameters.pop("binary_data_size")
        chunk = binary[offset : offset + size]
        offset += size
        output = response.outputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        for key, value in parameters.items():
            output.parameters[key].CopyFrom(_parameter(value))
        if raw:
            response.raw_output_contents.append(chunk)
            continue
        values = tensors.read_binary(entry["name"], entry["datatype"], entry["shape"], chunk)
        field = getattr(output.contents, _CONTENTS[entry["datatype"]])
        field.extend([v.encode("utf-8") for v in values] if entry["datatype"] == "BYTES" else values)
    return response


def _peer(peer: str) -> tuple[str, int] | None:
    """("ipv4:10.0.0.5:5000" | "ipv6:[::1]:5000", maybe percent-encoded) as (host, port); None for a Unix socket."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    return host.strip("[]"), int(port)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every RPC as the REST call of the same meaning, through the whole app."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app: Any = ProxyHeadersMiddleware(app, trusted_hosts=settings.trusted_proxies)
        # gRPC's Python server does not show the call's authority: the Host of its REST call is the first of
        # MLAPI_TRUSTED_HOSTS (NGINX has already matched the site's name), else the bind address.
        host = settings.trusted_hosts[0] if settings.trusted_hosts else (settings.grpc_bind or "").rpartition(":")[0]
        if host == "*":
            host = ""
        elif host.startswith("*."):
            host = "grpc" + host[1:]
        self.host = (host or "localhost").encode("latin-1")
        self.background: set[asyncio.Task[None]] = set()

    async def _call(
        self, context: Any, rpc: str, method: str, path: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> Answer:
        metadata = [
            (key.lower(), value) for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str) and not key.startswith((":", "grpc-")) and key.lower() not in _NOT_HEADERS
        ]
        request_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in [*metadata, *headers]]
        request_headers += [(b"content-length", str(len(body)).encode()), (b"user-agent", _user_agent(context)),
                            (b"host", self.host)]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8"),
            "query_string": b"",
            "root_path": "",
            "headers": request_headers,
            "client": _peer(context.peer()),
            "server": None,
            "extensions": {"mlapi.rpc": rpc},
        }
        sent = False
        answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.wait([answered])  # then background tasks (shadow scoring) see the client gone
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False) and not answered.done():
                    answered.set_result(Answer(start["status"], start.get("headers", []), b"".join(parts)))

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:  # the middleware answers every error; this is past its reach
                log.exception("gRPC call failed", extra={"rpc": rpc})
                if not answered.done():
                    answered.set_exception(exc)
            finally:
                if not answered.done():
                    answered.set_exception(RuntimeError(f"{method} {path} ended without an answer"))

        # The app runs on after its answer (background tasks): the RPC is answered at once, as HTTP is.
        task = asyncio.ensure_future(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        answer = await asyncio.shield(answered)
        request_id = answer.headers.get("x-request-id")
        if request_id:
            await context.send_initial_metadata((("x-request-id", request_id),))
        return answer

    async def _ok(self, context: Any, rpc: str, method: str, path: str, **kwargs: Any) -> Answer:
        answer = await self._call(context, rpc, method, path, **kwargs)
        if not 200 <= answer.status < 300:
            raise answer.refused()
        return answer

    @staticmethod
    def _model_path(name: str, version: str) -> str:
        if not name:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "name the model: model_name (or name) is empty")
        quoted = _quote(name) + (f"/versions/{_quote(version)}" if version else "")
        return f"/v2/models/{quoted}"

    async def ServerLive(self, request: Any, context: Any) -> Any:
        answer = await self._ok(context, "ServerLive", "GET", "/v2/health/live")
        return pb.ServerLiveResponse(live=bool(answer.json().get("live")))

    async def ServerReady(self, request: Any, context: Any) -> Any:
        answer = await self._call(context, "ServerReady", "GET", "/v2/health/ready")
        if answer.status not in (200, 503):
            raise answer.refused()
        return pb.ServerReadyResponse(ready=answer.status == 200)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        path = self._model_path(request.name, request.version) + "/ready"
        answer = await self._ok(context, "ModelReady", "GET", path)
        return pb.ModelReadyResponse(ready=bool(answer.json().get("ready")))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        metadata = (await self._ok(context, "ServerMetadata", "GET", "/v2")).json()
        # Binary tensor data and the configuration route are REST's; classification works over gRPC too.
        extensions = [e for e in metadata["extensions"] if e == "classification"]
        return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"], extensions=extensions)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        path = self._model_path(request.name, request.version)
        metadata = (await self._ok(context, "ModelMetadata", "GET", path)).json()

        def tensor(t: dict[str, Any]) -> Any:
            return pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])

        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(t) for t in metadata["inputs"]],
            outputs=[tensor(t) for t in metadata["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        path = self._model_path(request.model_name, request.model_version) + "/infer"
        body, header_length, raw = infer_body(request)
        answer = await self._ok(
            context, "ModelInfer", "POST", path, body=body,
            headers=[(tensors.HEADER_LENGTH, str(header_length)), ("content-type", "application/octet-stream")],
        )
        return infer_response(answer, raw)


def _quote(segment: str) -> str:
    return quote(segment, safe="")


def _user_agent(context: Any) -> bytes:
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent" and isinstance(value, str):
            return value.encode("latin-1", "replace")
    return b"grpc"


class _Refusals(aio.ServerInterceptor):
    """A Refused raised by an RPC becomes its gRPC status, with the REST error's message."""

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def answered(request: Any, context: Any) -> Any:
            try:
                return await behaviour(request, context)
            except Refused as refused:
                if refused.trailers:
                    context.set_trailing_metadata(refused.trailers)
                await context.abort(refused.code, refused.message)

        return grpc.unary_unary_rpc_method_handler(
            answered,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class Listener:
    """One worker's gRPC server, and its hand-over to the workers that replace it.

    HTTP's listening socket is the master's, so connections wait in its backlog while workers change;
    each worker's gRPC socket is its own. On a reload gunicorn forks the new workers and stops the old
    ones at once, so an old worker that closed its socket before a new one opened its own would leave
    the port closed, and a client would be refused. A stopping worker therefore keeps serving until a
    sibling (another child of the same master) is listening, or no sibling is still starting (a full
    stop), or the master is gone; each worker says which it is with a marker file in the instance's
    metrics folder (``grpc/<pid>.up``, ``grpc/<pid>.stopping``)."""

    POLL_SECONDS = 0.02

    def __init__(self, server: aio.Server, servicer: InferenceServicer, marks: Path | None,
                 handoff_seconds: float) -> None:
        self.server = server
        self.servicer = servicer
        self.marks = marks
        self.handoff_seconds = handoff_seconds
        self.pid = os.getpid()
        self.master = os.getppid()
        if marks is not None:
            marks.mkdir(parents=True, exist_ok=True)
            (marks / f"{self.pid}.stopping").unlink(missing_ok=True)  # a marker of an earlier process of this pid
            (marks / f"{self.pid}.up").touch()

    def _state(self, pid: int) -> str:
        assert self.marks is not None
        if (self.marks / f"{pid}.up").exists():
            return "up"
        return "stopping" if (self.marks / f"{pid}.stopping").exists() else "starting"

    def _siblings(self) -> set[int] | None:
        try:
            children = Path(f"/proc/{self.master}/task/{self.master}/children").read_text().split()
        except OSError:
            return None
        return {int(pid) for pid in children} - {self.pid}

    async def stop(self, grace: float) -> None:
        """Hand over, then stop: RPCs in flight and the app's work after them get ``grace`` seconds each."""
        if self.marks is not None:
            (self.marks / f"{self.pid}.stopping").touch()
            (self.marks / f"{self.pid}.up").unlink(missing_ok=True)
            deadline = time.monotonic() + self.handoff_seconds
            while time.monotonic() < deadline and os.getppid() == self.master:
                siblings = self._siblings()
                if siblings is None:
                    break
                states = {self._state(pid) for pid in siblings}
                if "up" in states or "starting" not in states:
                    break
                await asyncio.sleep(self.POLL_SECONDS)
        await self.server.stop(grace)
        if self.servicer.background:  # what the app does after its answers (shadow scoring)
            await asyncio.wait(set(self.servicer.background), timeout=grace)
        if self.marks is not None:
            (self.marks / f"{self.pid}.stopping").unlink(missing_ok=True)


async def start(app: Any, settings: Settings) -> Listener:
    """Start this worker's gRPC server on MLAPI_GRPC_BIND; a port that cannot be bound stops the worker."""
    assert settings.grpc_bind
    server = aio.server(
        interceptors=[_Refusals()],
        maximum_concurrent_rpcs=settings.limit_concurrency or None,
        options=[
            ("grpc.so_reuseport", 1),
            # The body limit holds for gRPC messages too: a larger one is refused before it is read.
            ("grpc.max_receive_message_length", settings.max_body_bytes),
        ],
    )
    servicer = InferenceServicer(app, settings)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(settings.grpc_bind)
    except RuntimeError as exc:
        raise RuntimeError(f"MLAPI_GRPC_BIND={settings.grpc_bind}: cannot listen there ({exc}); "
                           "choose a free host:port") from None
    await server.start()
    log.info("gRPC listening", extra={"bind": settings.grpc_bind, "port": port, "service": SERVICE})
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # one per instance, emptied by a fresh master
    marks = Path(metrics_dir) / "grpc" if metrics_dir else None
    # The hand-over and the RPCs in flight share half of gunicorn's graceful timeout; the HTTP side had its turn.
    return Listener(server, servicer, marks, handoff_seconds=min(10.0, settings.graceful_timeout / 4))
