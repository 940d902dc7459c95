"""Request and response schemas.

A request body's features are checked by the one input path (app/packages/validation.py),
with the manifest of the version that scores them, never here: pydantic only
parses the JSON. The models below show each model's features in the OpenAPI
schema and /docs: their real names, types, and the known categories of a string
feature as an enum when the model refuses unknown ones. A feature is a field
with a safe internal name and the feature's name as its alias, so any column
name works, even one pydantic reserves (``model_config``) or one that is no
Python identifier (``sepal width``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, create_model

from app.packages.manifest import Feature, Manifest
from app.packages.validation import reference_row


class FeaturesBase(BaseModel):
    """Feature values by name; an ordered list of values is accepted too."""

    model_config = ConfigDict(extra="forbid")


def _names(manifest: Manifest) -> list[str]:
    return [f.name for f in manifest.features]


def field_names(manifest: Manifest) -> tuple[str, ...]:
    """The attribute that holds each feature in the schema model, in manifest order."""
    return tuple(f"feature_{i}" for i in range(len(manifest.features)))


def _class_name(model_name: str, suffix: str) -> str:
    words = "".join(ch if ch.isalnum() else " " for ch in model_name).split()
    return "".join(w[:1].upper() + w[1:] for w in words) + suffix


def _example(manifest: Manifest) -> dict[str, Any]:
    return dict(zip(_names(manifest), reference_row(manifest.features, manifest.reference), strict=True))


def _value_type(feature: Feature, max_abs: float) -> Any:
    """What one feature's value is, as a type the JSON schema shows (its check is app/packages/validation.py's)."""
    if feature.type == "string":
        if feature.allow_unknown:
            return Annotated[str, Field(description=f"{feature.name} (string: a category; known "
                                                    f"{list(feature.categories or ())}, others are scored too)")]
        return Annotated[Literal[tuple(feature.categories or ())],
                         Field(description=f"{feature.name} (string: one of the categories the model knows)")]
    if feature.type == "bool":
        return Annotated[bool, Field(description=f"{feature.name} (bool)")]
    if feature.type == "int" and feature.categories is not None and not feature.allow_unknown:
        return Annotated[Literal[tuple(feature.categories)],
                         Field(description=f"{feature.name} (int: one of the values the model's encoder knows)")]
    number = int if feature.type == "int" else float
    return Annotated[number, Field(ge=-max_abs, le=max_abs, description=f"{feature.name} ({feature.type})")]


def feature_model(manifest: Manifest, max_abs: float) -> type[FeaturesBase]:
    """The features of one model as a pydantic model: what the OpenAPI schema shows for a request."""
    example = _example(manifest)
    fields: dict[str, Any] = {
        field_name: (
            Annotated[_value_type(feature, max_abs),
                      Field(alias=feature.name, title=feature.name, examples=[example[feature.name]])],
            ...,
        )
        for field_name, feature in zip(field_names(manifest), manifest.features, strict=True)
    }
    return create_model(
        _class_name(manifest.name, "Features"),
        __base__=FeaturesBase,
        __doc__=f"Features of model {manifest.name!r}, by name (or as a list in this order).",
        **fields,
    )


def _parsed_only(manifest: Manifest, max_abs: float) -> Any:
    """A body value pydantic parses without checking; the schema shows the features by name, or as a list
    of exactly one value per feature in manifest order."""
    in_order = tuple[tuple(_value_type(f, max_abs) for f in manifest.features)]  # type: ignore[misc, valid-type]
    shown = feature_model(manifest, max_abs) | in_order
    return Annotated[Any, PlainValidator(lambda value: value, json_schema_input_type=shown)]


def request_models(manifest: Manifest, max_abs: float, max_batch: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(single, batch) request models for one model."""
    features = _parsed_only(manifest, max_abs)
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
