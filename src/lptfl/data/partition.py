"""Split a dataset's sample indices among federated clients: Dirichlet (non-IID) and IID."""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np

logger = logging.getLogger(__name__)

# Balancing stops once every client's expected size is within BALANCE_TOLERANCE of the mean (relative);
# it warns if max_iter rounds leave a client further than BALANCE_WARNING from it.
BALANCE_TOLERANCE = 1e-6
BALANCE_WARNING = 1e-2
SUMMARY_CLIENTS = 5  # clients listed one by one in partition_summary


def _check_clients(num_clients: int, num_samples: int) -> None:
    if not isinstance(num_clients, numbers.Integral) or isinstance(num_clients, bool) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of samples ({num_samples}); every client "
            "needs data, so use at most as many clients as samples"
        )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    return labels


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.exp(x - peak).sum(axis=axis))


def _log_dirichlet(rng: np.random.Generator, alpha: float, rows: int, cols: int) -> np.ndarray:
    """log of a (rows x cols) matrix whose rows are Dirichlet(alpha) draws.

    Drawn in log space with Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha), U ~ Uniform(0, 1], so a
    tiny alpha (0.01) never underflows to exact zeros, which no rescaling could then turn into data.
    """
    log_gamma = np.log(rng.standard_gamma(alpha + 1.0, size=(rows, cols)))
    log_gamma += np.log1p(-rng.random((rows, cols))) / alpha
    return log_gamma - _logsumexp(log_gamma, axis=1)[:, None]


def _balance(log_proportions: np.ndarray, class_sizes: np.ndarray, max_iter: int) -> np.ndarray:
    """Rescale (classes x clients) log proportions so every client expects the same number of samples.

    Sinkhorn in log space: alternately scale columns (clients) to the mean client size and rows
    (classes) to the class sizes; with equal class sizes this is the paper's doubly stochastic
    proportion matrix. Returns proportions (classes x clients) whose rows sum to 1.
    """
    log_sizes = np.log(class_sizes.astype(np.float64))[:, None]
    log_target = np.log(class_sizes.sum() / log_proportions.shape[1])
    log_expected = log_proportions + log_sizes  # log of the expected samples of class c at client k
    error = math.inf
    for _ in range(max_iter):
        log_expected += log_target - _logsumexp(log_expected, axis=0)
        log_expected += log_sizes - _logsumexp(log_expected, axis=1)[:, None]
        error = float(np.abs(np.expm1(_logsumexp(log_expected, axis=0) - log_target)).max())
        if error < BALANCE_TOLERANCE:
            break
    if error > BALANCE_WARNING:
        logger.warning(
            "Dirichlet balancing stopped after max_iter=%d iterations with client sizes off by up to "
            "%.2g of the mean; the clients stay that unequal in size", max_iter, error,
        )
    return np.exp(log_expected - log_sizes)


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    balance: bool = True,
    max_iter: int = 1000,
) -> list[np.ndarray]:
    """Non-IID split: each class is shared among clients by proportions drawn from Dirichlet(alpha).

    ``labels``: int array (N,). A (classes x clients) proportion matrix is drawn from
    Dirichlet(alpha) row by row (``np.random.default_rng(seed)``; in log space, see _log_dirichlet).
    With ``balance`` (the paper's setting) it is rescaled by alternate column/row normalisation
    (at most ``max_iter`` rounds, stopping when client sizes agree to 1e-6) so every client gets
    about N / num_clients samples; without it, it is plain Dirichlet and clients may get very
    different amounts, even none.
    Each class's indices are shuffled and cut by its row of proportions.

    Returns ``num_clients`` sorted int64 index arrays; every sample appears in exactly one.
    Smaller alpha = more skewed label distributions (the paper uses 0.01, 0.04, 0.16).
    """
    labels = _check_labels(labels)
    _check_clients(num_clients, labels.size)
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r} (the paper uses 0.01, 0.04, 0.16)")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(labels, return_counts=True)
    log_proportions = _log_dirichlet(rng, float(alpha), classes.size, num_clients)
    proportions = _balance(log_proportions, class_sizes, max_iter) if balance else np.exp(log_proportions)
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(class_sizes)[:-1])
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for indices, row in zip(by_class, proportions):
        cumulative = np.cumsum(row)
        cuts = np.rint(cumulative[:-1] / cumulative[-1] * indices.size).astype(np.int64)
        for client, chunk in enumerate(np.split(rng.permutation(indices), cuts)):
            pieces[client].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64, copy=False) for p in pieces]


def iid_partition(num_samples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """IID split of ``range(num_samples)`` into ``num_clients`` sorted int64 arrays whose sizes
    differ by at most one (a seeded random permutation cut into equal parts)."""
    _check_clients(num_clients, num_samples)
    permutation = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64, copy=False) for part in np.array_split(permutation, num_clients)]


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> str:
    """Human-readable summary of a partition: client sizes, classes per client, first few clients.

    ``labels``: int array (N,) in [0, num_classes); ``parts``: index arrays, one per client.
    """
    labels = _check_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    if not parts:
        raise ValueError("parts is empty; expected one index array per client")
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])  # clients x classes
    sizes = counts.sum(axis=1)
    classes_held = (counts > 0).sum(axis=1)

    def spread(values: np.ndarray) -> str:
        return f"min {values.min()} / median {np.median(values):g} / max {values.max()}"

    lines = [
        f"{len(parts)} clients, {sizes.sum()} of {labels.size} samples assigned, {num_classes} classes",
        f"samples per client: {spread(sizes)}",
        f"classes per client: {spread(classes_held)}",
    ]
    for client, row in enumerate(counts[:SUMMARY_CLIENTS]):
        top = np.argsort(-row, kind="stable")[: min(3, int((row > 0).sum()))]
        held = ", ".join(f"class {c}: {row[c]}" for c in top)
        lines.append(f"  client {client}: {row.sum()} samples ({held or 'none'})")
    if len(parts) > SUMMARY_CLIENTS:
        lines.append(f"  ... {len(parts) - SUMMARY_CLIENTS} more clients")
    return "\n".join(lines)
