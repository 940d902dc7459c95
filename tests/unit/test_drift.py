"""Drift: reference statistics from the sample, PSI near 0 for like data and large for shifted data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.packages.gate import load_package
from app.packages.manifest import Feature, Manifest
from app.packages.reference import check_reference, reference_statistics
from app.serving.drift import DriftMonitor, psi

FEATURES = ["a", "b"]


def _manifest(sample: np.ndarray, names: list[str] = FEATURES) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        created="2026-01-01T00:00:00Z",
        task="regressor",
        features=[Feature(n) for n in names],
        classes=None,
        versions={},
        files={},
        metrics={},
        reference=reference_statistics(sample, names),
        onnx={"kept": False},
    )


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def reference(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(2000, 2))


def test_reference_statistics_describe_the_sample(reference: np.ndarray):
    stats = reference_statistics(reference, FEATURES)["a"]
    assert len(stats["bin_edges"]) == 9 and stats["bin_edges"] == sorted(stats["bin_edges"])
    assert stats["proportions"] == pytest.approx([0.1] * 10, abs=0.002)
    assert stats["mean"] == pytest.approx(reference[:, 0].mean())
    assert stats["std"] == pytest.approx(reference[:, 0].std())
    assert (stats["min"], stats["max"]) == (reference[:, 0].min(), reference[:, 0].max())


def test_no_score_before_enough_samples(reference: np.ndarray):
    monitor = DriftMonitor(_manifest(reference), window=500, min_samples=100)
    monitor.observe(reference[:99])
    assert monitor.scores() is None
    assert monitor.status() == {
        "samples": 99,
        "window": 500,
        "scores": None,
        "drifted": [],
        "method": "psi",
        "alert_psi": 0.2,
    }


def test_data_like_the_reference_scores_near_zero(reference: np.ndarray, rng: np.random.Generator):
    monitor = DriftMonitor(_manifest(reference), window=1000, min_samples=100)
    monitor.observe(rng.normal(size=(1000, 2)))
    scores = monitor.scores()
    assert set(scores) == set(FEATURES)
    assert all(value < 0.05 for value in scores.values()), scores
    assert monitor.status()["drifted"] == []


def test_a_shifted_feature_scores_high_and_is_reported(reference: np.ndarray, rng: np.random.Generator):
    monitor = DriftMonitor(_manifest(reference), window=1000, min_samples=100, alert_psi=0.2)
    shifted = rng.normal(size=(1000, 2))
    shifted[:, 1] += 1.0  # one standard deviation
    monitor.observe(shifted)
    scores = monitor.scores()
    assert scores["b"] > 0.2 and scores["a"] < 0.05
    assert monitor.status()["drifted"] == ["b"]


def test_values_outside_the_reference_range_still_count(reference: np.ndarray):
    monitor = DriftMonitor(_manifest(reference), window=200, min_samples=100)
    monitor.observe(np.full((200, 2), 1e6))
    assert min(monitor.scores().values()) > 5


def test_the_window_keeps_only_the_most_recent_rows(reference: np.ndarray, rng: np.random.Generator):
    monitor = DriftMonitor(_manifest(reference), window=500, min_samples=100)
    monitor.observe(rng.normal(size=(700, 2)) + 3)  # larger than the window
    assert monitor.scores()["a"] > 1
    for size in (130, 170, 90, 110):  # 500 like-reference rows in uneven batches, wrapping the ring
        monitor.observe(rng.normal(size=(size, 2)))
    assert monitor.status()["samples"] == 500
    assert monitor.scores()["a"] < 0.1


def test_ring_buffer_scores_equal_scores_of_the_last_window_rows(reference: np.ndarray, rng: np.random.Generator):
    manifest = _manifest(reference)
    monitor = DriftMonitor(manifest, window=300, min_samples=10)
    seen = rng.normal(size=(1000, 2)) * np.linspace(0.5, 2, 1000)[:, None]
    for start in range(0, 1000, 77):
        monitor.observe(seen[start : start + 77])
    direct = DriftMonitor(manifest, window=300, min_samples=10)
    direct.observe(seen[-300:])
    assert monitor.scores() == pytest.approx(direct.scores())


def test_a_feature_with_few_distinct_values_scores_zero_for_the_same_mix(rng: np.random.Generator):
    binary = rng.integers(0, 2, size=(1000, 2)).astype(float)
    monitor = DriftMonitor(_manifest(binary), window=1000, min_samples=100)
    monitor.observe(binary)
    assert monitor.scores() == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-12)


def test_psi_is_finite_with_empty_bins():
    assert 0 < psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])) < 20


def test_demo_package_reference_works_with_the_monitor(demo_models: Path):
    model = load_package(demo_models / "iris" / "1")
    monitor = DriftMonitor(model.manifest, window=200, min_samples=50)
    monitor.observe(np.tile([[5.1, 3.5, 1.4, 0.2]], (60, 1)))
    status = monitor.status()
    assert status["samples"] == 60 and set(status["scores"]) == set(model.feature_names)
    assert status["drifted"]  # sixty copies of one flower are nothing like the validation split


def test_the_reference_a_package_records_passes_the_gates_check(rng: np.random.Generator):
    names = ["spread", "two values", "constant"]
    sample = np.column_stack([rng.normal(size=200), np.repeat([1.0, 2.0], 100), np.full(200, 3.0)])
    check_reference(reference_statistics(sample, names), names)


COLOURS = Feature("colour", "string", ("blue", "green", "red"), allow_unknown=True)


def _colour_manifest(codes: np.ndarray) -> Manifest:
    return Manifest(
        name="m", version="1", created="2026-01-01T00:00:00Z", task="regressor", features=[COLOURS],
        classes=None, versions={}, files={}, metrics={},
        reference=reference_statistics(codes.reshape(-1, 1), [COLOURS]), onnx={"kept": False},
    )


def test_a_string_feature_is_scored_over_its_category_shares(rng: np.random.Generator):
    sample = rng.choice([0.0, 1.0, 2.0], size=3000, p=[0.6, 0.3, 0.1])
    manifest = _colour_manifest(sample)
    assert manifest.reference["colour"]["proportions"] == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    same = DriftMonitor(manifest, window=1000, min_samples=100)
    same.observe(rng.choice([0.0, 1.0, 2.0], size=(1000, 1), p=[0.6, 0.3, 0.1]))
    shifted = DriftMonitor(manifest, window=1000, min_samples=100)
    shifted.observe(rng.choice([0.0, 1.0, 2.0], size=(1000, 1), p=[0.1, 0.3, 0.6]))
    assert same.scores()["colour"] < 0.1 < 0.2 < shifted.scores()["colour"]
    assert same.status()["unseen_categories"] == {"colour": 0.0}


def test_unseen_categories_are_a_bin_of_their_own_and_their_share_is_reported(rng: np.random.Generator):
    monitor = DriftMonitor(_colour_manifest(rng.choice([0.0, 1.0, 2.0], size=1000)), window=1000, min_samples=100)
    monitor.observe(np.concatenate([np.full((250, 1), -1.0), rng.choice([0.0, 1.0, 2.0], size=(750, 1))]))
    assert monitor.unseen() == {"colour": 0.25}
    assert monitor.scores()["colour"] > 0.2


def test_a_string_features_reference_must_hold_its_categories(rng: np.random.Generator):
    reference = reference_statistics(rng.choice([0.0, 1.0, 2.0], size=(100, 1)), [COLOURS])
    del reference["colour"]["categories"]
    with pytest.raises(ValueError, match=r"reference\.colour\.categories"):
        check_reference(reference, [COLOURS])
