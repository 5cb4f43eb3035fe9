"""Client-side local training under a precision policy (REFERENCE §1.1, §3).

One :class:`LocalTrainer` (one model, one optimizer) serves every client in turn: load the
downlink weights and the client's optimizer state, run E epochs of mini-batch steps,
hand back the trained state. A step is: forward with quantized activations -> loss ->
backward with quantized errors -> quantize gradients -> inner optimizer step -> quantize
weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lptfl.quant import PrecisionPolicy, reseed_quantizers
from lptfl.quant.compiled import MaybeCompiled, mismatch

OPTIMIZERS = ("adam", "sgd", "sgd-momentum")
# Largest relative L2 differences between the compiled and the eager first step, of the loss and of
# all gradients together. Both use the same rounding keys, but reassociation flips some roundings
# and the flips cascade, most where the loss is small, so loss differences count against at least
# STEP_LOSS_FLOOR nats; a miscompiled step (zero, scaled or unrelated results) differs by O(1), in
# its gradients even where its loss is small (measurements: docs/measurements.md).
STEP_LOSS_TOLERANCE = 0.1
STEP_LOSS_FLOOR = 1.0
STEP_GRAD_TOLERANCE = 0.25

Regularizer = Callable[[nn.Module], torch.Tensor]


class LocalObjective(Protocol):
    """Extra terms of the local loss that need more than the model (e.g. FedGen's generated
    features). Keep one object per run: the compiled step is specialised to it.

    ``inputs`` runs outside the compiled step (no gradient) and returns tensors that are
    passed on to ``extra_loss``, which runs inside it and returns a scalar added to the loss.
    """

    def inputs(self, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]: ...

    def extra_loss(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                   *inputs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TrainResult:
    """What one client's local update produced.

    Attributes:
        state: the trained model's state dict (on the weight grid under a low-precision policy).
        loss: mean training loss over the samples seen (nats).
        num_samples: training samples of the client (per epoch).
        steps: optimizer steps taken.
    """

    state: dict[str, torch.Tensor]
    loss: float
    num_samples: int
    steps: int

    def diverged_entry(self) -> str | None:
        """The first floating entry of ``state`` holding NaN or an infinity (the training diverged;
        no payload can carry it), or None."""
        return next((name for name, value in self.state.items()
                     if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``adam`` (the paper's), ``sgd`` (plain, as the published code's ``SGD``) or ``sgd-momentum``
    (momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


class LocalTrainer:
    """Runs client updates on one reusable model + optimizer.

    Args:
        model: the architecture (quantizers are inserted according to ``policy``).
        policy: the precision policy.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: learning rate.
        example_input: one batch, used to pick layers for exact bf16 compute.
        compile: fuse forward/backward (and the quantizers) with ``torch.compile``.
        compile_mode: ``torch.compile``'s mode (e.g. ``"reduce-overhead"`` for CUDA graphs).
        device: where training runs.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: PrecisionPolicy,
        *,
        optimizer: str = "adam",
        lr: float = 1e-3,
        example_input: torch.Tensor | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.policy = policy
        self.model = model.to(self.device)
        policy.prepare_model(self.model, None if example_input is None else example_input.to(self.device))
        self.inner = make_optimizer(optimizer, self.model.parameters(), lr)
        self.optimizer = policy.wrap_optimizer(self.inner, compile=compile, compile_mode=compile_mode)
        self._forward_backward = MaybeCompiled(self._loss_and_backward, enabled=compile, mode=compile_mode)
        self.compiled = compile
        self._step_checked = not compile
        self.objective: LocalObjective | None = None
        # Per-sample models (no batch norm) pad a short last batch to full size with zero-weight
        # copies of its own samples: identical loss, gradients and activation maxima, one graph.
        self._pad_short_batches = compile and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def _loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = (losses * weight).sum() / weight.sum()
        total = loss
        if self.objective is not None:
            total = loss + self.objective.extra_loss(self.model, logits, y, weight, *extra)
        total.backward()
        return loss.detach()

    def _step_loss(self, x: torch.Tensor, y: torch.Tensor, batch: torch.Tensor, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
        """Forward + backward of one mini-batch; returns its mean (data) loss."""
        k = int(batch.shape[0])
        weight = torch.ones(k, device=x.device)
        step = self._forward_backward
        if k < batch_size and self.compiled:
            if not self._pad_short_batches:  # batch norm: run the odd size eagerly, no recompilation
                step = self._loss_and_backward
            else:
                batch = batch[torch.arange(batch_size, device=batch.device) % k]
                weight = torch.cat([weight, torch.zeros(batch_size - k, device=x.device)])
        yb = y[batch]
        extra = () if self.objective is None else self.objective.inputs(yb, generator)
        if step is self._forward_backward and not self._step_checked:
            self._step_checked = True
            return self._checked_step(x[batch], yb, weight, *extra)
        return step(x[batch], yb, weight, *extra)

    def _snapshot(self) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """Copies of the gradients (None where absent) and buffers (e.g. batch-norm statistics)."""
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()]
        return grads, [b.detach().clone() for b in self.model.buffers()]

    @torch.no_grad()
    def _restore(self, snapshot: tuple[list[torch.Tensor | None], list[torch.Tensor]]) -> None:
        grads, buffers = snapshot
        for p, grad in zip(self.model.parameters(), grads):
            p.grad = None if grad is None else grad.clone()
        for buffer, saved in zip(self.model.buffers(), buffers):
            buffer.copy_(saved)

    @staticmethod
    def _flat(grads: list[torch.Tensor | None], params: list[nn.Parameter]) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])

    def _checked_step(self, *args: torch.Tensor) -> torch.Tensor:
        """The first compiled step, repeated eagerly from the same state (same rounding keys).

        If the two agree (loss within ``STEP_LOSS_TOLERANCE`` of the larger of itself and
        ``STEP_LOSS_FLOOR``, gradients within ``STEP_GRAD_TOLERANCE``) the compiled step's
        gradients and buffers are kept, so the check changes no result (a resumed run still
        matches an uninterrupted one). Otherwise the eager ones are kept and the compiled step is
        dropped for good, with a warning.
        """
        before = self._snapshot()
        loss = self._forward_backward(*args)
        if not self._forward_backward.active:  # it failed to compile and ran eagerly
            return loss
        compiled_loss, compiled = loss.clone(), self._snapshot()
        self._restore(before)
        eager_loss = self._loss_and_backward(*args)
        params = list(self.model.parameters())
        why = (mismatch(compiled_loss, eager_loss, STEP_LOSS_TOLERANCE, floor=STEP_LOSS_FLOOR)
               or mismatch(self._flat(compiled[0], params), self._flat([p.grad for p in params], params),
                           STEP_GRAD_TOLERANCE))
        if why is not None:
            self._forward_backward.disable(f"torch.compile gave a wrong training step on {self.device} ({why})")
            return eager_loss
        self._restore(compiled)
        return compiled_loss

    def train(
        self,
        start: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int,
        batch_size: int,
        generator: torch.Generator,
        regularizer: Regularizer | None = None,
        objective: LocalObjective | None = None,
    ) -> TrainResult:
        """Train from ``start`` on the client's samples.

        Args:
            start: state dict to start from (the decoded downlink).
            x: the client's inputs, ``n x C x H x W`` (float32, normalised).
            y: the client's labels, ``n`` (int64).
            epochs: local epochs E.
            batch_size: mini-batch size (the last batch of an epoch may be smaller).
            generator: drives shuffling and stochastic rounding (seeded per client and round).
            regularizer: extra loss term on the model (e.g. FedProx's proximal term).
            objective: extra loss terms with their own inputs (e.g. FedGen's); pass the
                same object every time.
        """
        if regularizer is not None and objective is not None and not hasattr(regularizer, "add_gradient"):
            raise ValueError("a regularizer without add_gradient cannot be combined with an objective")
        self.objective = objective
        model, opt = self.model, self.optimizer
        model.load_state_dict(start)
        model.train()
        if hasattr(opt, "generator"):
            opt.generator = generator
        x, y = x.to(self.device), y.to(self.device)
        n = int(y.shape[0])
        total, steps = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start_index in range(0, n, batch_size):
                batch = order[start_index : start_index + batch_size]
                reseed_quantizers(model, generator)
                opt.zero_grad(set_to_none=False)
                if regularizer is None:
                    loss = self._step_loss(x, y, batch, batch_size, generator)
                elif hasattr(regularizer, "add_gradient"):  # closed-form gradient: keeps the fused step
                    loss = self._step_loss(x, y, batch, batch_size, generator)
                    regularizer.add_gradient()
                else:
                    loss = F.cross_entropy(model(x[batch]), y[batch])
                    (loss + regularizer(model)).backward()
                    loss = loss.detach()
                opt.step()
                total += loss.to(torch.float64) * len(batch)
                steps += 1
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return TrainResult(state=state, loss=float(total) / max(n * epochs, 1), num_samples=n, steps=steps)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1000,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss in nats, accuracy as a fraction 0-1) of ``model`` on ``(x, y)``.

    ``forward`` (e.g. a compiled ``model``) replaces ``model(x)``; every batch it sees has
    ``batch_size`` rows (a short last batch is padded with copies of its own rows, which
    leaves per-tensor activation maxima unchanged, and the copies are not scored).
    """
    loss_sum, correct, n = evaluate_sums(model, x, y, batch_size=batch_size, forward=forward)
    return loss_sum / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1000,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pad: bool | None = None,
) -> tuple[float, int, int]:
    """(summed cross-entropy in nats, correct predictions, samples) of ``model`` on ``(x, y)``: the
    sums of :func:`evaluate`, which add up over parts of a test set split at batch boundaries.
    ``pad``: pad a short last batch (None: where ``x`` has more than one batch; a part of a test set
    passes what the whole would do)."""
    model.eval()
    forward = model if forward is None else forward
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i, logits in batched_logits(forward, x, batch_size, device, pad=pad):
        yb = y[i : i + logits.shape[0]].to(device)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").to(torch.float64)
        correct += (logits.argmax(1) == yb).sum()
    return float(loss_sum), int(correct), int(y.shape[0])


def batched_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
                   device: torch.device, *, pad: bool | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start index, logits)`` of ``forward`` over ``x`` in batches of ``batch_size`` rows on ``device``.

    A short last batch is padded to full size with copies of its own rows (``pad``; None: when ``x``
    has more than one batch), so a compiled ``forward`` sees one shape and per-tensor activation
    maxima are unchanged; the copies' logits are dropped.
    """
    n = int(x.shape[0])
    pad = n > batch_size if pad is None else pad
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(device)
        k = int(xb.shape[0])
        if k < batch_size and pad:
            xb = xb[torch.arange(batch_size, device=device) % k]
        yield i, forward(xb)[:k]
