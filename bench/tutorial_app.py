"""The reference app: a prediction API written the way the tutorials write it.

Run: ``MODEL_PATH=models/iris/1/model.joblib uvicorn bench.tutorial_app:app``
(one process, uvicorn's defaults). Kept deliberately naive, because that is the
baseline users start from: the model loads at import, the endpoint is
``async def`` so inference blocks the event loop, and every request calls
``predict`` and then ``predict_proba`` on the scikit-learn model.
"""

import os

import joblib
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

model = joblib.load(os.environ.get("MODEL_PATH", "model.joblib"))

app = FastAPI()


class IrisFeatures(BaseModel):
    sepal_length: float
    sepal_width: float
    petal_length: float
    petal_width: float


class PredictRequest(BaseModel):
    features: IrisFeatures


@app.post("/v1/predict")
async def predict(request: PredictRequest):
    f = request.features
    X = np.array([[f.sepal_length, f.sepal_width, f.petal_length, f.petal_width]])
    prediction = model.predict(X)[0]
    probabilities = model.predict_proba(X)[0]
    return {
        "prediction": str(prediction),
        "probabilities": {str(c): float(p) for c, p in zip(model.classes_, probabilities, strict=True)},
    }
