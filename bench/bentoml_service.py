"""The BentoML contender: the service BentoML's own scikit-learn example has a user write, on the demo packages'
``model.joblib`` files, run by ``bentoml serve bentoml_service:Contender`` in the bench's BentoML venv
(scripts/harness/client_envs/bentoml.txt; bench/peers.py starts it).

Settings come from the environment, as the bench sets them: MLAPI_BENCH_BENTOML_MODELS (JSON, model name ->
model.joblib path) and MLAPI_BENCH_BENTOML_WORKERS (BentoML's ``workers``: processes sharing the listener).
It answers ``{"model": NAME, "instances": [[...], ...]}`` with the labels and the probabilities, as the kit does.
"""

import json
import os

import bentoml
import joblib
import numpy as np

MODEL_FILES: dict[str, str] = json.loads(os.environ["MLAPI_BENCH_BENTOML_MODELS"])


@bentoml.service(workers=int(os.environ.get("MLAPI_BENCH_BENTOML_WORKERS", "1")))
class Contender:
    def __init__(self) -> None:
        self.models = {name: joblib.load(path) for name, path in MODEL_FILES.items()}

    @bentoml.api
    def predict(self, model: str, instances: np.ndarray) -> dict:
        estimator = self.models[model]
        return {"predictions": estimator.predict(instances).tolist(),
                "probabilities": estimator.predict_proba(instances).tolist()}
