"""The prediction routes' hot path: the shortcut for well-formed requests, and where a row is scored."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.serving import inference
from scripts.harness.samples import IRIS_ROW

LOGREG = "/v1/models/iris-logreg/predict"
ROUTES = [
    ("/v1/predict", {"features": IRIS_ROW}),
    ("/v1/predict/batch", {"instances": [IRIS_ROW, list(IRIS_ROW.values())]}),
    ("/v1/models/iris/versions/1/predict", {"features": IRIS_ROW}),
    ("/v1/models/diabetes/predict", {"features": [0.01, -0.04, 0.06, 0.02, -0.04, -0.03, -0.04, -0.0, 0.02, -0.02]}),
]


def _without_request_id(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "request_id"}


@pytest.mark.parametrize("path,body", ROUTES)
def test_the_shortcut_answers_as_fastapi_does(client, path, body):
    """application/json takes the shortcut; another JSON media type FastAPI accepts goes through FastAPI."""
    content = json.dumps(body)
    shortcut = client.post(path, content=content, headers={"Content-Type": "application/json", "X-User-ID": "u1"})
    fastapi = client.post(path, content=content, headers={"Content-Type": "application/vnd.mlapi+json",
                                                          "X-User-ID": "u1"})
    assert shortcut.status_code == fastapi.status_code == 200
    assert _without_request_id(shortcut.json()) == _without_request_id(fastapi.json())
    assert shortcut.headers["content-type"] == fastapi.headers["content-type"]
    assert shortcut.json()["request_id"] == shortcut.headers["x-request-id"]


@pytest.mark.parametrize(
    "headers,status",
    [
        ({"X-Model-Version": "9"}, 404),
        ({"X-Model-Version": "1" * 65}, 422),
        ({"X-User-ID": "u" * 257}, 422),
    ],
)
def test_header_errors_are_answered_by_fastapi(client, headers, status):
    r = client.post("/v1/predict", json={"features": IRIS_ROW}, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


class EngineCalls:
    """Records, for every call into a model, whether it ran on the thread of the event loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client) -> None:
        self.on_loop: list[bool] = []
        for served in client.app.state.registry.models.values():
            for model in served.versions.values():
                monkeypatch.setattr(model.engine, "run", self._wrap(model.engine.run))

    def _wrap(self, run):
        def recorded(X):
            try:
                asyncio.get_running_loop()
                self.on_loop.append(True)
            except RuntimeError:
                self.on_loop.append(False)
            return run(X)

        return recorded


def _predict(c, path: str, n: int) -> None:
    for _ in range(n):
        r = c.post(path, json={"features": IRIS_ROW})
        assert r.status_code == 200 and r.json()["prediction"] == "setosa"


def test_a_cheap_single_row_is_scored_on_the_event_loop_once_measured(make_client, demo_models, monkeypatch, capsys):
    monkeypatch.setattr(inference, "INLINE_MAX_SECONDS", float("inf"))
    with make_client(demo_models, rate_limit_enabled=False) as c:
        calls = EngineCalls(monkeypatch, c)
        _predict(c, LOGREG, inference.COST_SAMPLES + 3)
    assert calls.on_loop == [False] * inference.COST_SAMPLES + [True] * 3
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "single-row cost" in line]
    assert [(e["model"], e["inline"]) for e in logged] == [("iris-logreg", True)]
    assert logged[0]["row_cost_ms"] > 0


def test_a_costly_single_row_stays_in_the_threadpool(make_client, demo_models, monkeypatch, capsys):
    monkeypatch.setattr(inference, "INLINE_MAX_SECONDS", 0.0)
    with make_client(demo_models, rate_limit_enabled=False) as c:
        calls = EngineCalls(monkeypatch, c)
        _predict(c, LOGREG, inference.COST_SAMPLES + 3)
    assert calls.on_loop == [False] * (inference.COST_SAMPLES + 3)
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "single-row cost" in line]
    assert [e["inline"] for e in logged] == [False]


def test_with_rate_limits_the_model_is_never_called_on_the_event_loop(make_client, demo_models, monkeypatch):
    """The limit check may call a network store (Redis): it and the model run in the threadpool."""
    monkeypatch.setattr(inference, "INLINE_MAX_SECONDS", float("inf"))
    with make_client(demo_models, rate_limit_enabled=True) as c:
        calls = EngineCalls(monkeypatch, c)
        _predict(c, LOGREG, inference.COST_SAMPLES + 3)
    assert calls.on_loop == [False] * (inference.COST_SAMPLES + 3)


def test_batches_are_never_scored_on_the_event_loop(make_client, demo_models, monkeypatch):
    monkeypatch.setattr(inference, "INLINE_MAX_SECONDS", float("inf"))
    with make_client(demo_models, rate_limit_enabled=False) as c:
        calls = EngineCalls(monkeypatch, c)
        _predict(c, LOGREG, inference.COST_SAMPLES)
        r = c.post(LOGREG + "/batch", json={"instances": [IRIS_ROW] * 3})
        assert r.status_code == 200 and r.json()["predictions"] == ["setosa"] * 3
    assert calls.on_loop[-1] is False


def test_every_prediction_route_of_the_app_takes_the_shortcut(client):
    from app.api.predict import PredictRoute

    routes = [r for r in client.app.router.routes if isinstance(r, PredictRoute)]
    routes += [r for included in client.app.router.routes
               for r in getattr(getattr(included, "original_router", None), "routes", [])
               if isinstance(r, PredictRoute)]
    assert routes, "no prediction route found in the app"
    assert all(r.shortcut is not None for r in routes), [r.path for r in routes if r.shortcut is None]


@pytest.mark.parametrize("change", ["a router dependency", "a header renamed", "the body embedded"])
def test_a_prediction_route_the_shortcut_would_solve_otherwise_is_refused_when_built(demo_models, change, monkeypatch):
    """The router checks, as it builds each route, that the shortcut supplies exactly what FastAPI would solve."""
    from fastapi import APIRouter, Depends
    from slowapi import Limiter
    from slowapi.util import get_remote_address

    from app.api import predict
    from app.api.deps import ApiKey
    from app.api.schemas import request_models
    from app.main import route_manifests
    from app.settings import Settings

    async def tenant(request):  # a dependency someone adds to the router
        return None

    settings = Settings(models_dir=demo_models, default_model="iris")
    manifest = route_manifests(settings)["iris"]
    single, _batch = request_models(manifest, settings.max_abs_value, settings.max_batch_size)
    dependencies = [ApiKey, Depends(tenant)] if change == "a router dependency" else [ApiKey]
    router = APIRouter(prefix="/v1", dependencies=dependencies, route_class=predict.PredictRoute)
    limit = Limiter(key_func=get_remote_address, enabled=False).limit("10/second")
    if change == "the body embedded":  # FastAPI would then want {"body": {...}}
        from typing import Annotated

        from fastapi import Body

        made = predict.route_endpoint
        monkeypatch.setattr(predict, "route_endpoint", lambda func, name, versioned, body: made(
            func, name, versioned, body=Annotated[body, Body(embed=True)]))
    headers = dict(predict.SHORTCUT_HEADERS)
    if change == "a header renamed":
        predict.SHORTCUT_HEADERS["user_id"] = "x-user"
    try:
        with pytest.raises(RuntimeError) as refused:
            predict._add_route(router, "/predict", "iris", single, limit, settings, batch=False, versioned=False)
    finally:
        predict.SHORTCUT_HEADERS.clear()
        predict.SHORTCUT_HEADERS.update(headers)
    message = str(refused.value)
    assert "POST /v1/predict" in message and "app/api/predict.py" in message
    expected = {"a router dependency": "router's dependencies", "a header renamed": "headers",
                "the body embedded": "reads the body as"}[change]
    assert expected in message, message
