"""Dirichlet and IID partitions: coverage, determinism, balance, validation, summary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lptfl.data import dirichlet_partition, iid_partition, partition_summary

FAST = settings(max_examples=40, deadline=None)


@st.composite
def problems(draw):
    """(labels, num_clients, alpha, seed, balance) for small partition problems."""
    num_samples = draw(st.integers(1, 400))
    num_classes = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, num_classes, size=num_samples)
    num_clients = draw(st.integers(1, min(num_samples, 30)))
    alpha = draw(st.sampled_from([0.01, 0.04, 0.16, 0.5, 1.0, 100.0]))
    return labels, num_clients, alpha, seed, draw(st.booleans())


def assert_exact_cover(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(num_samples))


@FAST
@given(problems())
def test_dirichlet_assigns_every_sample_exactly_once(problem) -> None:
    labels, num_clients, alpha, seed, balance = problem
    parts = dirichlet_partition(labels, num_clients, alpha, seed=seed, balance=balance)
    assert_exact_cover(parts, labels.size, num_clients)


@FAST
@given(problems())
def test_dirichlet_is_reproducible_from_its_seed(problem) -> None:
    labels, num_clients, alpha, seed, balance = problem
    first = dirichlet_partition(labels, num_clients, alpha, seed=seed, balance=balance)
    again = dirichlet_partition(labels, num_clients, alpha, seed=seed, balance=balance)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_different_seeds_give_different_partitions() -> None:
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet_partition(labels, 10, 0.1, seed=0)
    b = dirichlet_partition(labels, 10, 0.1, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=25, deadline=None)
@given(
    num_clients=st.integers(2, 80),
    alpha=st.sampled_from([0.01, 0.04, 0.16, 1.0, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_balanced_dirichlet_gives_clients_about_equal_sizes(num_clients: int, alpha: float, seed: int) -> None:
    labels = np.repeat(np.arange(10), 600)  # 10 classes, 6000 samples
    sizes = np.array([p.size for p in dirichlet_partition(labels, num_clients, alpha, seed=seed)])
    mean = labels.size / num_clients
    assert sizes.min() > 0
    assert sizes.max() / sizes.min() <= 1.25
    assert np.abs(sizes - mean).max() <= 0.05 * mean + 10  # rounding: at most one sample per class


def test_balancing_warns_when_max_iter_leaves_clients_unequal(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(10), 600)
    with caplog.at_level("WARNING", logger="lptfl.data.partition"):
        dirichlet_partition(labels, 10, 0.01, seed=0)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="lptfl.data.partition"):
        dirichlet_partition(labels, 10, 0.01, seed=0, max_iter=1)
    assert "Dirichlet balancing stopped after max_iter=1 iterations" in caplog.text


def test_small_alpha_concentrates_labels_and_large_alpha_spreads_them() -> None:
    labels = np.repeat(np.arange(10), 600)

    def mean_classes_held(alpha: float) -> float:
        parts = dirichlet_partition(labels, 20, alpha, seed=3)
        return float(np.mean([np.unique(labels[p]).size for p in parts]))

    assert mean_classes_held(0.01) < 3 < 9 < mean_classes_held(100.0)


def test_unbalanced_dirichlet_is_plain_and_uneven() -> None:
    labels = np.repeat(np.arange(10), 600)
    sizes = [p.size for p in dirichlet_partition(labels, 40, 0.01, seed=0, balance=False)]
    assert min(sizes) == 0 and max(sizes) > 600


def test_balancing_handles_unequal_class_sizes() -> None:
    labels = np.concatenate([np.zeros(3000, np.int64), np.ones(600, np.int64), np.full(2400, 7)])
    sizes = np.array([p.size for p in dirichlet_partition(labels, 12, 0.3, seed=5)])
    assert sizes.max() - sizes.min() <= 6


@FAST
@given(num_samples=st.integers(1, 1000), data=st.data())
def test_iid_partition_exact_cover_and_equal_sizes(num_samples: int, data) -> None:
    num_clients = data.draw(st.integers(1, num_samples))
    seed = data.draw(st.integers(0, 2**32 - 1))
    parts = iid_partition(num_samples, num_clients, seed=seed)
    assert_exact_cover(parts, num_samples, num_clients)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(num_samples, num_clients, seed=seed)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"alpha must be a finite number > 0, got 0\.0"),
        ({"alpha": -1.0}, r"got -1\.0"),
        ({"alpha": float("nan")}, "got nan"),
        ({"alpha": float("inf")}, "got inf"),
        ({"num_clients": 0}, r"num_clients must be an integer >= 1, got 0"),
        ({"num_clients": 2.5}, r"got 2\.5"),
        ({"num_clients": 11}, r"num_clients=11 exceeds the number of samples \(10\)"),
        ({"max_iter": 0}, r"max_iter must be >= 1, got 0"),
        ({"labels": np.zeros((2, 5), np.int64)}, r"labels must be a 1-D integer array, got int64 of shape \(2, 5\)"),
        ({"labels": np.zeros(10)}, "1-D integer array, got float64"),
    ],
)
def test_dirichlet_validation(kwargs, message: str) -> None:
    args = {"labels": np.arange(10) % 3, "num_clients": 4, "alpha": 0.5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(**args)


def test_iid_validation() -> None:
    with pytest.raises(ValueError, match=r"num_clients=6 exceeds the number of samples \(5\)"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError, match="got -1"):
        iid_partition(5, -1, seed=0)


def test_partition_summary() -> None:
    labels = np.repeat(np.arange(10), 600)
    parts = dirichlet_partition(labels, 8, 0.01, seed=0)
    text = partition_summary(labels, parts, 10)
    lines = text.splitlines()
    assert lines[0] == "8 clients, 6000 of 6000 samples assigned, 10 classes"
    sizes = sorted(p.size for p in parts)
    assert lines[1] == f"samples per client: min {sizes[0]} / median {np.median(sizes):g} / max {sizes[-1]}"
    held = sorted(np.unique(labels[p]).size for p in parts)
    assert lines[2] == f"classes per client: min {held[0]} / median {np.median(held):g} / max {held[-1]}"
    assert len(lines) == 9 and lines[-1] == "  ... 3 more clients"
    top = np.bincount(labels[parts[0]], minlength=10).argmax()
    assert lines[3].startswith(f"  client 0: {parts[0].size} samples (class {top}: ")
    with pytest.raises(ValueError, match=r"labels span 0\.\.9, expected 0\.\.4"):
        partition_summary(labels, parts, 5)
    with pytest.raises(ValueError, match="parts is empty"):
        partition_summary(labels, [], 10)
