"""The models being served: which versions are loaded, and which one answers a request.

Loading happens once per gunicorn master before workers fork (so the model's
memory is shared copy-on-write) and again on SIGHUP. A reload builds a complete
new table first and only then swaps it in: a package that fails the
compatibility gate never replaces one that is serving. Whatever goes wrong with
one package is that package's refusal; loading never raises, because in the
gunicorn master an exception would stop the service.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import APIError
from app.logs import get_logger
from app.metrics import DRIFT, MODEL_INFO, MODEL_LOAD_FAILURES, PREDICTIONS, Series
from app.packages.gate import ModelVersion, discover, load_package
from app.packages.manifest import PackageError, as_refusal
from app.serving.drift import DriftMonitor
from app.settings import Settings

log = get_logger("registry")


class UnknownModel(LookupError):
    pass


class VersionNotServing(APIError):
    """A client asked for a loaded version that takes no traffic."""

    def __init__(self, message: str) -> None:
        super().__init__(403, message, code="version_not_serving")


@dataclass
class ServedModel:
    """One model name: its loaded versions and how requests are split between them."""

    name: str
    versions: dict[str, ModelVersion]
    weights: dict[str, float]  # primary versions only
    shadow: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def default_version(self) -> str:
        return max(self.weights, key=lambda v: self.weights[v])

    def choose(
        self, user_id: str | None = None, override: str | None = None, *, overrides: str = "serving"
    ) -> ModelVersion:
        """The version that serves a request.

        An explicit version wins, but with ``overrides="serving"`` (MLAPI_VERSION_OVERRIDE) only a
        version with a weight above 0: a shadow or weight-0 version is staged, not released, and
        a client must not be able to reach it. Otherwise the weights decide: with a user id the
        choice is a stable hash of (model, user), so a user stays on one version across requests,
        workers, hosts and restarts; without one it is random.
        """
        if override is not None:
            model = self.versions.get(override)
            choosable = sorted(self.versions) if overrides == "loaded" else sorted(self.weights)
            if model is None:
                raise UnknownModel(
                    f"model {self.name!r} has no loaded version {override!r}; choose one of {choosable}"
                )
            if overrides != "loaded" and override not in self.weights:
                why = "it is the shadow version" if override == self.shadow else "its weight is 0"
                raise VersionNotServing(
                    f"model {self.name!r} version {override!r} takes no traffic ({why}), so clients may not "
                    f"choose it; choose one of {choosable}, or set MLAPI_VERSION_OVERRIDE=loaded to let "
                    "clients choose any loaded version"
                )
            return model
        if len(self.weights) == 1:
            return self.versions[next(iter(self.weights))]
        point = stable_fraction(f"{self.name}:{user_id}") if user_id else random.random()
        return self.versions[pick_weighted(self.weights, point)]


def stable_fraction(text: str) -> float:
    """A number in [0, 1) that depends only on ``text`` (never Python's salted hash())."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_weighted(weights: dict[str, float], point: float) -> str:
    total = sum(weights.values())
    cumulative = 0.0
    chosen = None
    for version in sorted(weights, key=_version_key):
        if weights[version] <= 0:
            continue
        chosen = version
        cumulative += weights[version] / total
        if point < cumulative:
            return version
    assert chosen is not None
    return chosen


class VersionState:
    """What one process keeps about one loaded version while it serves, in one place.

    The package's identity on disk (a reload keeps the loaded object of a version that did not change), its
    drift monitor and the rows seen since its gauges were refreshed (app/serving/inference.py), its measured
    single-row cost, which decides whether a row is scored on the event loop, and its metric series: predictions
    by label, drift by feature and the loaded gauge. The registry makes one when it loads a version and drops it
    with the version. A dropped version's loaded gauge is set to 0; its other series stay exported until the
    process ends (a reload under gunicorn replaces the workers).
    """

    def __init__(self, model: ModelVersion, stamp: tuple[int, int, int] | None, settings: Settings) -> None:
        self.model = model
        self.stamp = stamp
        # Made with the version: a package the monitor cannot read is refused when it loads, not when it serves.
        self.drift = DriftMonitor(
            model.manifest,
            window=settings.drift_window,
            min_samples=settings.drift_min_samples,
            alert_psi=settings.drift_alert_psi,
        )
        self.rows_since_refresh = 0
        self.row_costs: list[float] = []
        self.inline: bool | None = None  # None until measured
        self.predictions = Series(PREDICTIONS, model.name, model.version)  # by predicted label
        self.drift_psi = Series(DRIFT, model.name, model.version)  # by feature
        self.loaded = Series(MODEL_INFO, model.name, model.version, model.engine.name)


def _version_key(v: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in v.replace("-", ".").split("."))


class ModelRegistry:
    """All served models; thread-safe swap of the whole table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], VersionState] = {}
        self._loading: dict[tuple[str, str], VersionState] = {}  # states of the versions loaded by this load
        self.loaded = False
        self.last_error: str | None = None

    # ----- loading -------------------------------------------------------
    def load(self) -> dict[str, ServedModel]:
        """Load (or reload) every configured model; keep what serves if a new package fails. Never raises."""
        try:
            return self._load()
        except Exception as exc:  # a bug here must not stop the master: keep the table that serves
            log.exception("model reload failed; the models loaded before keep serving")
            with self._lock:
                self.last_error = f"loading the model packages failed ({type(exc).__name__}: {exc})"
            return self._models
        finally:
            self._loading = {}  # an interrupted load keeps none of what it loaded

    def _load(self) -> dict[str, ServedModel]:
        models_dir = Path(self.settings.models_dir)
        previous = self._models
        unlisted: dict[str, PackageError] = {}
        try:
            available = discover(models_dir, unlisted)
        except PackageError as exc:  # the whole folder: nothing can be told apart, so nothing changes
            self._refused("", "", exc, kept=bool(previous))
            with self._lock:
                self.last_error = str(exc)
            return previous
        new: dict[str, ServedModel] = {}
        errors: list[str] = []
        names = set(available) | set(self.settings.models) | set(unlisted)
        for name in sorted(names):
            failures: list[dict[str, str]] = []
            if name in unlisted:
                served = self._keep_unlisted(name, unlisted[name], previous.get(name), failures)
            else:
                served = self._load_model(name, available.get(name, []), previous.get(name), failures)
            errors.extend(f["message"] for f in failures)
            if served is not None:
                new[name] = served
            else:
                errors.append(f"model {name!r}: no version could be loaded")
        if not names:
            errors.append(
                f"no model packages in {models_dir.resolve()}; run `make models` or "
                "mlapi package, or set MLAPI_MODELS_DIR"
            )
        states: dict[tuple[str, str], VersionState] = {}
        for served in new.values():
            for version, model in served.versions.items():
                key = (served.name, version)
                state = self._loading.get(key) or self._states.get(key)
                # A version kept after a refusal (or an unlistable folder) keeps the state it served with.
                states[key] = state if state is not None and state.model is model else self._new_state(model, None)
        with self._lock:
            previous_states, self._states = self._states, states
            self._models = new
            self.loaded = bool(new)
            self.last_error = "; ".join(errors) if errors else None
        serving = {state.loaded.fixed for state in states.values()}
        for state in previous_states.values():
            if state.loaded.fixed not in serving:  # gone, or served by another engine now
                state.loaded().set(0)
        for state in states.values():
            state.loaded().set(1)
        log.info(
            "models loaded",
            extra={
                "models": {n: {v: m.engine.name for v, m in s.versions.items()} for n, s in new.items()},
                "errors": errors or None,
            },
        )
        return new

    def _load_one(self, name: str, version: str, previous: ServedModel | None) -> ModelVersion:
        path = Path(self.settings.models_dir) / name / version
        old = previous.versions.get(version) if previous else None
        stamp = _fingerprint(path)
        state = self._states.get((name, version))
        if old is not None and stamp is not None and state is not None and state.model is old and state.stamp == stamp:
            self._loading[(name, version)] = state
            return old  # unchanged on disk: keep the loaded object (and its shared memory), and what it measured
        model = load_package(path, engine=self.settings.engine, onnx_threads=self.settings.onnx_threads)
        self._loading[(name, version)] = self._new_state(model, stamp)
        return model

    def _new_state(self, model: ModelVersion, stamp: tuple[int, int, int] | None) -> VersionState:
        return VersionState(model, stamp, self.settings)

    def _try(self, name: str, version: str, previous: ServedModel | None, failures: list[dict[str, str]]
             ) -> ModelVersion | None:
        try:
            return self._load_one(name, version, previous)
        except Exception as exc:  # PackageError, or anything else: a refusal of this package either way
            refusal = as_refusal(Path(self.settings.models_dir) / name / version, exc)
            failures.append({"version": version, "check": refusal.check, "message": str(refusal)})
            kept = previous.versions.get(version) if previous else None
            self._refused(name, version, refusal, kept=kept is not None)
            return kept

    @staticmethod
    def _refused(name: str, version: str, refusal: PackageError, *, kept: bool) -> None:
        MODEL_LOAD_FAILURES.labels(name, version, refusal.check).inc()
        log.error(
            "model package refused",
            extra={"model": name or None, "version": version or None, "check": refusal.check,
                   "detail": str(refusal), "kept_serving": kept},
        )

    def _keep_unlisted(
        self, name: str, refusal: PackageError, previous: ServedModel | None, failures: list[dict[str, str]]
    ) -> ServedModel | None:
        """A model folder that cannot be listed: what served from it goes on serving, refused."""
        self._refused(name, "", refusal, kept=previous is not None)
        failures.append({"version": "", "check": refusal.check, "message": str(refusal)})
        if previous is None:
            return None
        return ServedModel(name, previous.versions, previous.weights, previous.shadow, failures)

    def _load_model(
        self, name: str, versions_on_disk: list[str], previous: ServedModel | None, failures: list[dict[str, str]]
    ) -> ServedModel | None:
        route = self.settings.models.get(name)
        if route is not None:
            wanted = list(route.versions) + ([route.shadow] if route.shadow else [])
            loaded = {}
            for version in wanted:
                model = self._try(name, version, previous, failures)
                if model is not None:
                    loaded[version] = model
            weights = {v: w for v, w in route.versions.items() if v in loaded and w > 0}
            if not weights:
                return None
            shadow = route.shadow if route.shadow in loaded else None
            return ServedModel(name, loaded, weights, shadow, failures)
        # No routing entry: serve the newest version that passes the gate.
        for version in sorted(versions_on_disk, key=_version_key, reverse=True):
            model = self._try(name, version, previous, failures)
            if model is not None:
                return ServedModel(name, {version: model}, {version: 1.0}, None, failures)
        return None

    # ----- lookup --------------------------------------------------------
    @property
    def models(self) -> dict[str, ServedModel]:
        return self._models

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModel(f"no model named {name!r} is loaded; loaded: {sorted(self._models)}") from None

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        return next(iter(sorted(self._models)), None)

    def kept_state(self, model: ModelVersion) -> VersionState | None:
        """The state of a version this registry serves; None for one a reload has replaced or removed."""
        state = self._states.get((model.name, model.version))
        return state if state is not None and state.model is model else None

    def state(self, model: ModelVersion) -> VersionState:
        """The state of a loaded version. A request that chose a version just before a reload replaced or
        removed it gets a state of its own, kept by nobody: what it records goes with it."""
        return self.kept_state(model) or self._new_state(model, None)


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    """Identity of a package directory's manifest on disk: replaced or rewritten means reload."""
    try:
        st = (path / "manifest.json").stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)
