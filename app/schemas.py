"""Request and response schemas.

Request models are built from each model's manifest, so the OpenAPI schema and
/docs show the real feature names and types, and validation errors name the
feature that was wrong. A feature is a field with a safe internal name and the
feature's name as its alias, so any column name works, even one pydantic
reserves (``model_config``) or one that is no Python identifier (``sepal width``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.packaging import Manifest


class FeaturesBase(BaseModel):
    """Feature values by name; an ordered list of values is accepted too."""

    model_config = ConfigDict(extra="forbid")
    __feature_names__: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _ordered_list(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            names = cls.__feature_names__
            if len(data) != len(names):
                raise ValueError(
                    f"expected {len(names)} values in the order {list(names)}, got {len(data)}"
                )
            return dict(zip(names, data))
        return data


def _names(manifest: Manifest) -> list[str]:
    return [f.name for f in manifest.features]


def field_names(manifest: Manifest) -> tuple[str, ...]:
    """The attribute that holds each feature's value in a validated instance, in manifest order."""
    return tuple(f"feature_{i}" for i in range(len(manifest.features)))


def _class_name(model_name: str, suffix: str) -> str:
    words = "".join(ch if ch.isalnum() else " " for ch in model_name).split()
    return "".join(w[:1].upper() + w[1:] for w in words) + suffix


def feature_model(manifest: Manifest, max_abs: float) -> type[FeaturesBase]:
    """A pydantic model with one strict, finite, bounded number field per feature."""
    fields: dict[str, Any] = {}
    means = {f: (manifest.reference.get(f) or {}).get("mean") for f in _names(manifest)}
    for field_name, feature in zip(field_names(manifest), manifest.features, strict=True):
        example = means.get(feature.name)
        number = int if feature.type == "int" else float
        fields[field_name] = (
            Annotated[
                number,
                Field(
                    alias=feature.name,
                    title=feature.name,
                    strict=True,
                    allow_inf_nan=False,
                    ge=-max_abs,
                    le=max_abs,
                    description=f"{feature.name} ({feature.type})",
                    examples=[round(float(example), 3)] if example is not None else None,
                ),
            ],
            ...,
        )
    model = create_model(  # type: ignore[call-overload]
        _class_name(manifest.name, "Features"),
        __base__=FeaturesBase,
        __doc__=f"Features of model {manifest.name!r}, by name (or as a list in this order).",
        **fields,
    )
    model.__feature_names__ = tuple(_names(manifest))
    return model


def _example(manifest: Manifest) -> dict[str, float]:
    return {
        f: round(float((manifest.reference.get(f) or {}).get("mean", 0.0)), 3) for f in _names(manifest)
    }


def request_models(manifest: Manifest, max_abs: float, max_batch: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(single, batch) request models for one model."""
    features = feature_model(manifest, max_abs)
    example = _example(manifest)
    single = create_model(
        _class_name(manifest.name, "PredictRequest"),
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"features": example}]}),
        features=(features, ...),
    )
    batch = create_model(
        _class_name(manifest.name, "BatchRequest"),
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [{"instances": [example, example]}]}),
        instances=(Annotated[list[features], Field(min_length=1, max_length=max_batch)], ...),  # type: ignore[valid-type]
    )
    return single, batch


class Prediction(BaseModel):
    model: str = Field(description="Model name.")
    version: str = Field(description="Model version that answered.")
    prediction: str | int | float = Field(description="Class label (classifiers) or value (regressors).")
    probabilities: dict[str, float] | None = Field(None, description="Probability per class label (classifiers).")
    request_id: str

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "iris",
                    "version": "1",
                    "prediction": "setosa",
                    "probabilities": {"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0},
                    "request_id": "4f1c2a9e0b7d4e6f8a1b2c3d4e5f6a7b",
                }
            ]
        },
    )


class BatchPrediction(BaseModel):
    model: str
    version: str
    predictions: list[str | int | float]
    probabilities: list[dict[str, float]] | None = None
    request_id: str

    model_config = ConfigDict(protected_namespaces=())


class KServePrediction(BaseModel):
    """KServe's V1 protocol answer: one prediction per instance, in order."""

    predictions: list[str | int | float]

    model_config = ConfigDict(json_schema_extra={"examples": [{"predictions": ["setosa", "virginica"]}]})


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(default_factory=list)
    msg: str
    type: str | None = None


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request, rate_limited.")
    message: str
    request_id: str | None
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorInfo


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed JSON.",
        401: "API key missing.",
        403: "API key not accepted, or a version that takes no traffic.",
        404: "Unknown model or version.",
        413: "Batch or body over the limit.",
        422: "Invalid features: the details name each field.",
        429: "Rate limit exceeded; see Retry-After.",
        503: "Not ready: no model loaded or the rate-limit store is down.",
    }.items()
}


class ProtocolError(BaseModel):
    """The error shape of the Open Inference Protocol (/v2) and KServe's V1 protocol: one message."""

    error: str = Field(description="What was wrong and what to do.")


PROTOCOL_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError, "description": spec["description"]} for status, spec in ERROR_RESPONSES.items()
}
