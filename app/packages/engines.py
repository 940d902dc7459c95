"""Scoring engines: ONNX Runtime and scikit-learn behind one call.

``Engine.run(X)`` makes exactly one call into the model for a whole batch and
returns class probabilities ``(n, n_classes)`` in the package's class order for
a classifier, or values ``(n,)`` for a regressor. Labels are derived from the
probabilities by the caller (``ModelVersion.infer``), so a request never pays
for ``predict`` and ``predict_proba`` twice.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np

_ONNX_INPUT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}


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
        if hasattr(estimator, "feature_names_in_"):
            # Fitted on a DataFrame, it warns on every call with a plain array. The service has already put the
            # columns in the fitted order (the package gate checks the names), so the warning says nothing
            # here. Only scikit-learn's own warning is silenced, and only once such an engine exists (a
            # filter, unlike catch_warnings, is safe with the threadpool's concurrent calls).
            warnings.filterwarnings("ignore", message="X does not have valid feature names",
                                    category=UserWarning, module=r"sklearn(\.|$)")

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
        try:
            # One tensor of every feature, or (a model with string features) one [n, 1] tensor per feature.
            self._feeds = [(i.name, _ONNX_INPUT_DTYPES[i.type]) for i in inputs]
        except KeyError:
            types = sorted({i.type for i in inputs})
            raise ValueError(
                f"the ONNX model's input types {types} are not float, double, int64, bool or string"
            ) from None
        self.input_name, self.input_dtype = self._feeds[0]
        if len(inputs) == 1 and self.input_dtype not in (np.float32, np.float64):
            raise ValueError(f"the ONNX model's one input is {inputs[0].type}, not float or double")
        outputs = [o.name for o in self.session.get_outputs()]
        if output is None:
            # skl2onnx names a classifier's outputs (label, probabilities) and a regressor's (variable).
            output = "probabilities" if task == "classifier" and "probabilities" in outputs else outputs[-1]
        if output not in outputs:
            raise ValueError(f"the ONNX model has no output {output!r} (outputs: {outputs})")
        self.output_names = [output]

    def run(self, X: Any) -> np.ndarray:
        if len(self._feeds) == 1:
            feed = {self.input_name: np.ascontiguousarray(X, dtype=self.input_dtype)}
        else:
            # A DataFrame by column name; an array by position (the inputs are the features in manifest order).
            columns = X if hasattr(X, "columns") else {name: X[:, j] for j, (name, _) in enumerate(self._feeds)}
            feed = {name: np.asarray(columns[name], dtype=dtype).reshape(-1, 1) for name, dtype in self._feeds}
        (out,) = self.session.run(self.output_names, feed)
        out = np.asarray(out, dtype=np.float64)
        return out if self.task == "classifier" else out.reshape(-1)
