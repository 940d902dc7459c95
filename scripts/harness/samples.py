"""Sample inputs of the demo models (app/cli/train_demo.py): one iris row, as /v1 takes it."""

from __future__ import annotations

import json

IRIS_ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
# The /v1/predict request for that row, as an object and as the bytes sent.
IRIS = {"features": IRIS_ROW}
IRIS_BODY = json.dumps(IRIS).encode()
