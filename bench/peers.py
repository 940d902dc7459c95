"""The serving stacks a user would pick instead of the kit, run by the bench beside it on the same models.

- **MLServer** (1.7, its scikit-learn runtime) serves the demo packages' own ``model.joblib`` files, in a venv
  of its own (scripts/harness/client_envs/mlserver.txt: it pins FastAPI and Starlette below the service's):
  ``mlserver`` with ``parallel_workers`` equal to the kit's workers (one front process that parses HTTP and
  hands each request to a worker process), and ``mlserver-default`` with MLServer's default of one parallel worker.
  Requests ask for both outputs, ``predict`` and ``predict_proba``.
- **BentoML** (1.4, ``@bentoml.service(workers=N)`` with N the kit's workers, bench/bentoml_service.py) serves
  the same files, in its own venv (scripts/harness/client_envs/bentoml.txt); its workers share one listener.

The kit answers the label and the probabilities, so that is the answer compared: before any timing, each
peer's answer to the same rows is checked against the kit's (labels equal, probabilities within the ONNX
engine's tolerance).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np

from app.packages.manifest import ONNX_TOLERANCE
from scripts.harness.client_envs import client_python
from scripts.harness.servers import Process, free_port, wait_for

BENCH = Path(__file__).resolve().parent
MLSERVER_OUTPUTS = [{"name": "predict"}, {"name": "predict_proba"}]


class Peer(Process):
    """A peer's server: where it takes a model's rows, in which body, and how its answer reads."""

    name: str
    port: int
    models: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def path(self, model: str) -> str:
        raise NotImplementedError

    def body(self, model: str, rows: list[list[float]]) -> bytes:
        raise NotImplementedError

    def answer(self, body: dict) -> tuple[list, np.ndarray]:
        """(labels, probabilities) out of the peer's answer."""
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            # An AssertionError ends wait_for at once: the process is gone and will never be ready.
            assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
            try:
                return self.ready()
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, interval=0.5, what=f"{self.name} ready")


class MLServer(Peer):
    """``mlserver start`` over a folder of model settings, one model per demo package, stopped by PID.

    workers: ``parallel_workers``; None leaves MLServer's default (1). Its metrics endpoint and debug mode are off."""

    def __init__(self, name: str, model_files: dict[str, Path], workers: int | None, workdir: Path, log_path: Path):
        root = workdir / name
        for model, model_file in model_files.items():
            folder = root / model
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model-settings.json").write_text(json.dumps({
                "name": model, "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": str(model_file), "version": "1"}}))
        self.name, self.port, self.models = name, free_port(), list(model_files)
        # Metrics and debug mode off for both, as the kit's own figures carry no extra logging either.
        settings: dict = {"host": "127.0.0.1", "http_port": self.port, "grpc_port": free_port(),
                          "metrics_port": free_port(), "metrics_endpoint": None, "debug": False}
        if workers is not None:
            settings["parallel_workers"] = workers
        (root / "settings.json").write_text(json.dumps(settings))
        mlserver = client_python("mlserver").parent / "mlserver"
        super().__init__([str(mlserver), "start", str(root)], env=dict(os.environ), cwd=root, log=log_path)

    def path(self, model: str) -> str:
        return f"/v2/models/{model}/infer"

    def body(self, model: str, rows: list[list[float]]) -> bytes:
        """The Open Inference Protocol request MLServer's clients send for these rows, asking for both outputs."""
        tensor = {"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                  "data": [value for row in rows for value in row]}
        return json.dumps({"inputs": [tensor], "outputs": MLSERVER_OUTPUTS}).encode()

    def answer(self, body: dict) -> tuple[list, np.ndarray]:
        outputs = {o["name"]: o for o in body["outputs"]}
        proba = outputs["predict_proba"]
        return outputs["predict"]["data"], np.asarray(proba["data"], dtype=float).reshape(proba["shape"])

    def ready(self) -> bool:
        return all(httpx.get(f"{self.url}/v2/models/{m}/ready", timeout=2).status_code == 200 for m in self.models)


class BentoML(Peer):
    """``bentoml serve`` of bench/bentoml_service.py with ``workers`` processes, stopped by PID."""

    def __init__(self, model_files: dict[str, Path], workers: int, workdir: Path, log_path: Path):
        self.name, self.port, self.models = "bentoml", free_port(), list(model_files)
        home = workdir / "bentoml-home"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
               "MLAPI_BENCH_BENTOML_MODELS": json.dumps({m: str(f) for m, f in model_files.items()}),
               "MLAPI_BENCH_BENTOML_WORKERS": str(workers)}
        bentoml = client_python("bentoml").parent / "bentoml"
        super().__init__([str(bentoml), "serve", "bentoml_service:Contender", "--host", "127.0.0.1",
                          "--port", str(self.port)], env=env, cwd=BENCH, log=log_path)

    def path(self, model: str) -> str:
        return "/predict"

    def body(self, model: str, rows: list[list[float]]) -> bytes:
        return json.dumps({"model": model, "instances": rows}).encode()

    def answer(self, body: dict) -> tuple[list, np.ndarray]:
        return body["predictions"], np.asarray(body["probabilities"], dtype=float)

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200


def check_same_answers(kit_url: str, peer: Peer, model: str, rows: list[list[float]],
                       feature_names: list[str]) -> None:
    """The peer answers these rows as the kit does; RuntimeError naming the first difference otherwise."""
    kit = httpx.post(f"{kit_url}/v1/models/{model}/predict/batch",
                     json={"instances": [dict(zip(feature_names, row, strict=True)) for row in rows]}, timeout=30)
    theirs = httpx.post(peer.url + peer.path(model), content=peer.body(model, rows),
                        headers={"Content-Type": "application/json"}, timeout=30)
    if kit.status_code != 200 or theirs.status_code != 200:
        raise RuntimeError(f"{model}: the kit answered {kit.status_code} ({kit.text[:300]}), {peer.name} "
                           f"{theirs.status_code} ({theirs.text[:300]})")
    labels, proba = peer.answer(theirs.json())
    ours = kit.json()
    classes = list(ours["probabilities"][0])
    our_proba = np.array([[p[c] for c in classes] for p in ours["probabilities"]])
    if [str(label) for label in labels] != [str(label) for label in ours["predictions"]]:
        raise RuntimeError(f"{model}: {peer.name}'s labels {labels} differ from the kit's {ours['predictions']}")
    if proba.shape != our_proba.shape or not np.allclose(proba, our_proba, atol=ONNX_TOLERANCE, rtol=0):
        raise RuntimeError(f"{model}: {peer.name}'s probabilities differ from the kit's: {proba} vs {our_proba}")
