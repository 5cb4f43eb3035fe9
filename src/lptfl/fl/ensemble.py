"""Shared pieces of the data-free distillation algorithms (FedGen, FedFTG): label statistics
of the participating clients, the label-count-weighted teacher ensemble, the diversity loss
of conditional generators, and flat tensor views of optimizer state for checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def label_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class (int64, shape ``num_classes``) of integer labels ``y``."""
    return torch.bincount(y.reshape(-1).to(torch.int64).cpu(), minlength=num_classes)[:num_classes]


def class_weights(counts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class ensemble weights and the label distribution of a set of clients.

    Args:
        counts: one ``num_classes`` vector of sample counts per client (K vectors).

    Returns:
        ``(weights, prior)``: ``weights[k, c]`` = client k's share of all samples of class c
        (each column sums to 1 over the clients holding c, 0 where nobody holds it), shape
        ``K x num_classes``; ``prior[c]`` = the share of class c in all their data (sums to 1).
    """
    if not counts:
        raise ValueError("class_weights needs the label counts of at least one client")
    matrix = torch.stack([c.to(torch.float64) for c in counts])
    per_class = matrix.sum(0)
    if float(per_class.sum()) <= 0:
        raise ValueError("the clients' label counts are all zero")
    weights = matrix / per_class.clamp_min(1.0)
    prior = per_class / per_class.sum()
    return weights.to(torch.float32), prior.to(torch.float32)


def sample_labels(prior: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels (int64) drawn with replacement from the class distribution ``prior``."""
    return torch.multinomial(prior, n, replacement=True, generator=generator)


def weighted_teacher_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The class-level ensemble ``sum_k weights[k, y_i] * logits[k][i]`` (``n x classes``)."""
    stacked = torch.stack(list(logits))  # K x n x classes
    per_sample = weights[:, y].to(stacked.dtype).unsqueeze(-1)  # K x n x 1
    return (stacked * per_sample).sum(0)


def diversity_loss(noise: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_ij ||out_i - out_j|| * ||z_i - z_j||)`` (FedGen/FedFTG): small when different
    noise vectors give different outputs, so minimising it keeps the generator from collapsing."""
    out = output.reshape(output.shape[0], -1)
    z = noise.reshape(noise.shape[0], -1)
    out_dist = (out.unsqueeze(0) - out.unsqueeze(1)).abs().mean(-1)
    z_dist = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).mean(-1)
    return torch.exp(-(out_dist * z_dist).mean())


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(target || softmax(logits))`` (nats), shape ``n``."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="none").sum(1)


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named tensors ``<prefix>.<index>.<name>``."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{prefix}.{index}.{name}"] = value.detach().cpu().clone() if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Restore what :func:`optimizer_tensors` wrote under ``prefix`` (no entries: state cleared)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value.clone()
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
