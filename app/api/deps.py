"""Shared dependencies of the routers, as Annotated aliases."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from app.api.security import check_api_key
from app.errors import APIError
from app.serving.registry import ModelRegistry

# These do no I/O, so they are `async def`: FastAPI would otherwise hand each one to
# its threadpool, a thread switch per dependency per request.


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def api_key(request: Request) -> None:
    settings = request.app.state.settings
    if not settings.api_keys_required:
        return
    # The prediction shortcut checks the key and may then hand the same request to FastAPI, which
    # checks it again: the verdict is kept so that a wrong key counts once.
    verdict = getattr(request.state, "api_key_verdict", None)
    if verdict is None:
        try:
            # The check counts wrong keys in the rate-limit store (Redis in production): off the loop.
            await run_in_threadpool(check_api_key, request, settings)
            verdict = True
        except APIError as exc:
            verdict = exc
        request.state.api_key_verdict = verdict
    if isinstance(verdict, APIError):
        raise verdict


# Header limits, shared with the prediction routes' shortcut (app/api/predict.py).
USER_ID_MAX_LENGTH = 256
MODEL_VERSION_MAX_LENGTH = 64

RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ApiKey = Depends(api_key)
UserId = Annotated[
    str | None,
    Header(
        alias="X-User-ID",
        max_length=USER_ID_MAX_LENGTH,
        description="Stable user id: requests with the same id go to the same model version.",
    ),
]
VersionOverride = Annotated[
    str | None,
    Header(
        alias="X-Model-Version",
        max_length=MODEL_VERSION_MAX_LENGTH,
        description="Serve this model version, bypassing the weights.",
    ),
]


def path_version_signature(func: Any, versioned: bool, **annotations: Any) -> inspect.Signature:
    """``func``'s signature for a route: ``version`` a required string path parameter where the path has one
    and no parameter where it has none (so the schema never calls it optional), and the parameters named in
    ``annotations`` given those types."""
    params = []
    for param in inspect.signature(func).parameters.values():
        if param.name in annotations:
            param = param.replace(annotation=annotations[param.name])
        elif param.name == "version":
            if not versioned:
                continue
            param = param.replace(annotation=str, default=inspect.Parameter.empty)
        params.append(param)
    return inspect.signature(func).replace(parameters=params)


def route_endpoint(func: Any, name: str, versioned: bool, **annotations: Any) -> Any:
    """``func`` as the endpoint of one route: a function of its own named ``name`` (slowapi files limits by
    function name, so endpoints sharing one would each count every request again), with the signature of
    ``path_version_signature``. Both the /v1 prediction routes and the /v2 routes are made with it."""

    @functools.wraps(func)
    def endpoint(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__signature__ = path_version_signature(func, versioned, **annotations)  # type: ignore[attr-defined]
    return endpoint
