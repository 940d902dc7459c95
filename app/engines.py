"""Scoring engines: ONNX Runtime and scikit-learn behind one call.

``Engine.run(X)`` makes exactly one call into the model for a whole batch and
returns class probabilities ``(n, n_classes)`` in the package's class order for
a classifier, or values ``(n,)`` for a regressor. Labels are derived from the
probabilities by the caller (``LoadedModel.score``), so a request never pays
for ``predict`` and ``predict_proba`` twice.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np

# Estimators fitted on a DataFrame warn on every call with a plain array. The
# service has already put the columns in the fitted order (the package gate
# checks the names), so the warning carries no information here.
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)

_ONNX_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


class Engine(Protocol):
    name: str

    def run(self, X: np.ndarray) -> np.ndarray: ...


class SklearnEngine:
    name = "sklearn"

    def __init__(self, estimator: Any, task: str):
        self.estimator = estimator
        self.task = task
        # One request must not start a pool of threads per call (RandomForest n_jobs).
        params = estimator.get_params(deep=True) if hasattr(estimator, "get_params") else {}
        single_thread = {key: 1 for key in params if key == "n_jobs" or key.endswith("__n_jobs")}
        if single_thread:
            estimator.set_params(**single_thread)
        self._call = estimator.predict_proba if task == "classifier" else estimator.predict

    def run(self, X: np.ndarray) -> np.ndarray:
        import sklearn

        # Input is validated (finite, bounded) before it gets here.
        with sklearn.config_context(assume_finite=True):
            out = self._call(X)
        out = np.asarray(out, dtype=np.float64)
        return out if self.task == "classifier" else out.reshape(-1)


class OnnxEngine:
    name = "onnx"

    def __init__(self, model: bytes, task: str, *, output: str | None = None, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        self.task = task
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"the ONNX model has {len(inputs)} inputs; one tensor input is supported")
        self.input_name = inputs[0].name
        try:
            self.input_dtype = _ONNX_INPUT_DTYPES[inputs[0].type]
        except KeyError:
            raise ValueError(f"the ONNX model's input type {inputs[0].type} is not float or double") from None
        outputs = [o.name for o in self.session.get_outputs()]
        if output is None:
            # skl2onnx names a classifier's outputs (label, probabilities) and a regressor's (variable).
            output = "probabilities" if task == "classifier" and "probabilities" in outputs else outputs[-1]
        if output not in outputs:
            raise ValueError(f"the ONNX model has no output {output!r} (outputs: {outputs})")
        self.output_names = [output]

    def run(self, X: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(X, dtype=self.input_dtype)}
        (out,) = self.session.run(self.output_names, feed)
        out = np.asarray(out, dtype=np.float64)
        return out if self.task == "classifier" else out.reshape(-1)
