"""Request schemas from manifests: any column name is a feature, even one pydantic reserves or no identifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.harness.samples import IRIS_ROW
from tests.app_client import app_client
from tests.model_packages import ODD_FEATURES, odd_names_package

# The iris row under the odd names: features keep the iris order, so the label is the same.
ODD_ROW = dict(zip(ODD_FEATURES, IRIS_ROW.values(), strict=True))
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("odd")
    odd_names_package(models, "odd", "1")
    return models


@pytest.fixture(scope="module")
def odd_client(odd_models: Path):
    with app_client(odd_models, default_model="odd") as c:
        yield c


def _label(response) -> object:
    body = response.json()
    if "outputs" in body:  # /v2
        return body["outputs"][0]["data"]
    return body.get("prediction", body.get("predictions"))


# Every way a request reaches the model: the answer must be the iris label of the row.
PATHS = {
    "/v1 by name": ("/v1/predict", {"features": ODD_ROW}, "setosa"),
    "/v1 by name, shuffled": ("/v1/predict", {"features": dict(reversed(ODD_ROW.items()))}, "setosa"),
    "/v1 as a list": ("/v1/predict", {"features": list(ODD_ROW.values())}, "setosa"),
    "/v1 by model name": ("/v1/models/odd/predict", {"features": ODD_ROW}, "setosa"),
    "/v1 at a version": ("/v1/models/odd/versions/1/predict", {"features": ODD_ROW}, "setosa"),
    "/v1 batch, by name and as a list": (
        "/v1/predict/batch", {"instances": [ODD_ROW, VIRGINICA]}, ["setosa", "virginica"]),
    "/v2 one tensor per feature": (
        "/v2/models/odd/infer",
        {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in ODD_ROW.items()]},
        ["setosa"],
    ),
    "/v2 one tensor": (
        "/v2/models/odd/infer",
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": list(ODD_ROW.values())}]},
        ["setosa"],
    ),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_features_named_like_pydantic_attributes_are_served_on_every_path(odd_client, path):
    url, body, label = PATHS[path]
    r = odd_client.post(url, json=body)
    assert r.status_code == 200, r.text
    assert _label(r) == label


def test_the_openapi_schema_shows_the_real_feature_names(odd_client):
    schema = odd_client.get("/openapi.json").json()["components"]["schemas"]["OddFeatures"]
    assert list(schema["properties"]) == ODD_FEATURES
    assert schema["required"] == ODD_FEATURES


@pytest.mark.parametrize(
    ("features", "loc", "msg"),
    [
        ({**ODD_ROW, "feature_0": 1.0}, "feature_0", "is not a feature of this model"),
        ({k: v for k, v in ODD_ROW.items() if k != "model_config"}, "model_config", "feature is missing"),
        ({**ODD_ROW, "sepal width": "3.5"}, "sepal width", "must be a number, got the string '3.5'"),
    ],
    ids=["an internal field name", "a missing feature", "a string value"],
)
def test_errors_name_the_real_feature(odd_client, features, loc, msg):
    r = odd_client.post("/v1/predict", json={"features": features})
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert any(d["loc"][-1] == loc and msg in d["msg"] for d in details), details
