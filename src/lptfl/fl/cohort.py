"""A round's cohort trained as one batched model (``torch.func.vmap`` over stacked client weights).

K clients' weights are stacked along a new leading dimension and one step advances all of them:
``vmap`` runs the model once per client slice, so activation and error quantizers see each
client's tensor alone (a block never spans two clients, :class:`lptfl.quant.activation.Quantizer`),
and weight and gradient quantization treat dim 0 as the client (``quantize_with_key(cohort=True)``).
Each client keeps what it has in the sequential path (:class:`lptfl.fl.client.LocalTrainer`):

- its data order and number of steps: clients advance in lockstep; one whose epochs are done
  takes no further step and its Adam state does not move;
- its Adam state (as :data:`lptfl.fl.client_state.OptimizerArrays`, what the client-state store keeps);
- its rounding keys, drawn from its own generator in the sequential path's order (epoch
  permutation, then per step: quantizer keys, gradient keys, weight keys);
- its short last batch: clients whose batches differ in size in a step run as separate groups.

:func:`cohort_unsupported` says why a configuration cannot be batched (the caller then trains
its clients one after another).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lptfl.fl.client import (
    STEP_GRAD_TOLERANCE,
    STEP_LOSS_FLOOR,
    STEP_LOSS_TOLERANCE,
    LocalTrainer,
    TrainResult,
)
from lptfl.fl.client_state import OptimizerArrays
from lptfl.quant.activation import Quantizer
from lptfl.quant.compiled import MaybeCompiled, mismatch
from lptfl.quant.format import BFPFormat
from lptfl.quant.optim import LowPrecisionOptimizer
from lptfl.quant.quantize import quantize_with_key


def cohort_unsupported(trainer: LocalTrainer, *, objective: object | None = None,
                       regularizer: object | None = None) -> str | None:
    """Why ``trainer``'s clients cannot train as one batched cohort, or None when they can."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.model.modules()):
        return "batch norm updates its running statistics in place, which vmap cannot batch per client"
    if not isinstance(trainer.inner, torch.optim.Adam):
        return f"only Adam's update is batched, not {type(trainer.inner).__name__}'s"
    group = trainer.inner.param_groups[0]
    if group["weight_decay"] or group["amsgrad"] or group["maximize"] or len(trainer.inner.param_groups) > 1:
        return "only plain Adam (one parameter group, no weight decay, amsgrad or maximize) is batched"
    if objective is not None:
        return "an objective with its own per-client inputs (FedGen) draws them client by client"
    if regularizer is not None and not hasattr(regularizer, "mu"):
        return f"the regularizer {type(regularizer).__name__} has no closed-form gradient"
    quantizer_keys = {f"{name}.key" for name, m in trainer.model.named_modules() if isinstance(m, Quantizer)}
    others = [name for name, _ in trainer.model.named_buffers() if name not in quantizer_keys]
    if others:
        return f"the model has buffers ({', '.join(others[:3])}) that would need per-client copies"
    return None


@dataclass
class CohortClient:
    """One client of a cohort.

    Attributes:
        start: the state dict it starts from (the decoded downlink).
        x: its inputs, ``n x ...`` (float32, normalised).
        y: its labels, ``n`` (int64).
        generator: its generator (seeded per client and round, as in the sequential path).
        optimizer_state: its stored Adam state, or None for a fresh one.
    """

    start: Mapping[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    optimizer_state: OptimizerArrays | None = None


@dataclass
class CohortResult:
    """What one client of a cohort produced: its update and its new Adam state."""

    result: TrainResult
    optimizer_state: OptimizerArrays | None  # None: it took no step and had no state


def _draw_keys(generator: torch.Generator, count: int) -> torch.Tensor:
    """``count`` int32 rounding keys, as :func:`lptfl.quant.insert.reseed_quantizers` and
    :class:`lptfl.quant.optim.LowPrecisionOptimizer` draw them."""
    return torch.randint(-(1 << 31), (1 << 31) - 1, (count,), dtype=torch.int32, generator=generator)


class CohortTrainer:
    """Trains several clients at once on the architecture, policy and optimizer of ``trainer``.

    Args:
        trainer: the sequential trainer whose model (quantizers and bf16 layers inserted),
            precision formats and Adam settings the cohort uses. Check
            :func:`cohort_unsupported` first.
        compile: fuse the batched forward and backward with ``torch.compile`` (checked against
            eager on the first step, as the sequential trainer's).
        compile_mode: ``torch.compile``'s mode.
    """

    def __init__(self, trainer: LocalTrainer, *, compile: bool = False, compile_mode: str = "default") -> None:
        why = cohort_unsupported(trainer)
        if why is not None:
            raise ValueError(f"cannot train a batched cohort: {why}")
        self.device = trainer.device
        self.base = copy.deepcopy(trainer.model).to("meta")
        self.base.train()
        self.param_names = [name for name, _ in trainer.model.named_parameters()]
        self.state_names = list(trainer.model.state_dict())
        self.key_names = [f"{name}.key" for name, m in trainer.model.named_modules() if isinstance(m, Quantizer)]
        self.stochastic_quantizers = bool(self.key_names)
        optimizer = trainer.optimizer
        low = isinstance(optimizer, LowPrecisionOptimizer)
        self.grad_format: BFPFormat | None = optimizer.grad_format if low else None
        self.weight_format: BFPFormat | None = optimizer.weight_format if low else None
        group = trainer.inner.param_groups[0]
        self.betas: tuple[float, float] = tuple(group["betas"])
        self.eps: float = group["eps"]
        self._vloss = MaybeCompiled(vmap(self._loss), enabled=compile, mode=compile_mode)
        self._step_checked = not compile

    def _loss(self, params: dict[str, torch.Tensor], keys: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One client's mean loss over the rows of its batch with weight 1 (vmapped over the cohort;
        NaN for a client with none, whose rows are not used)."""
        logits = functional_call(self.base, (params, keys), (x,))
        return (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()

    def _moments(self, clients: list[CohortClient]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Stacked Adam moments ``(m, v)`` per parameter and the ``K x P`` float64 step counts."""
        shapes = [self._shape(name) for name in self.param_names]
        exp_avg = [torch.zeros(len(clients), *s, device=self.device) for s in shapes]
        exp_avg_sq = [torch.zeros(len(clients), *s, device=self.device) for s in shapes]
        steps = torch.zeros(len(clients), len(shapes), dtype=torch.float64)
        sizes = [math.prod(s) for s in shapes]
        for k, client in enumerate(clients):
            if client.optimizer_state is None:
                continue
            for name, stacks in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                flat = torch.from_numpy(np.asarray(client.optimizer_state[name], np.float32))
                for stack, part in zip(stacks, flat.split(sizes)):
                    stack[k] = part.view(stack.shape[1:])
            steps[k] = torch.from_numpy(np.asarray(client.optimizer_state["step"], np.float64))
        return exp_avg, exp_avg_sq, steps

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.get_parameter(name).shape)

    @torch.no_grad()
    def _adam(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
              exp_avg_sq: list[torch.Tensor], steps: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """``torch.optim.Adam``'s update (its single-tensor arithmetic) on stacked tensors whose
        clients have their own step counts; returns the new parameters. ``steps`` (``K x P``) are
        the counts after this step."""
        beta1, beta2 = self.betas
        out = []
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step = steps[:, i]
            view = (-1,) + (1,) * (p.ndim - 1)
            step_size = (lr / (1 - beta1**step)).to(torch.float32).to(p.device).view(view)
            bias2_sqrt = ((1 - beta2**step) ** 0.5).to(torch.float32).to(p.device).view(view)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            out.append(p + (-step_size) * m / denom)
        return out

    def train(self, clients: list[CohortClient], *, epochs: int, batch_size: int, lr: float,
              prox_mu: float = 0.0) -> list[CohortResult]:
        """Train ``clients`` together for ``epochs`` local epochs of ``batch_size`` batches.

        Args:
            clients: the cohort (at least one).
            epochs: local epochs E.
            batch_size: mini-batch size (each client's last batch of an epoch may be smaller).
            lr: Adam's learning rate.
            prox_mu: FedProx's ``mu``: ``2 mu (w - start)`` is added to each client's gradient.

        Returns:
            One result per client, in order.
        """
        if not clients:
            raise ValueError("a cohort needs at least one client")
        dev = self.device
        count = len(clients)
        params = [torch.stack([c.start[name].to(dev, torch.float32) for c in clients]) for name in self.param_names]
        anchors = [p.clone() for p in params] if prox_mu else None
        exp_avg, exp_avg_sq, steps = self._moments(clients)
        xs = [c.x.to(dev) for c in clients]
        ys = [c.y.to(dev) for c in clients]
        sizes = [int(y.shape[0]) for y in ys]
        per_epoch = [math.ceil(n / batch_size) for n in sizes]
        totals = [epochs * s for s in per_epoch]
        orders: list[torch.Tensor | None] = [None] * count
        loss_sums = torch.zeros(count, dtype=torch.float64, device=dev)
        for step in range(max(totals, default=0)):
            active = [k for k in range(count) if step < totals[k]]
            batches, keys = {}, {}
            for k in active:
                within = step % per_epoch[k]
                if within == 0:
                    orders[k] = torch.randperm(sizes[k], generator=clients[k].generator).to(dev)
                batches[k] = orders[k][within * batch_size : (within + 1) * batch_size]
                keys[k] = self._step_keys(clients[k].generator)
            grads = self._gradients(params, active, batches, keys, xs, ys, loss_sums, batch_size)
            self._update(params, grads, exp_avg, exp_avg_sq, steps, active, keys, lr, prox_mu, anchors)
        results = []
        for k in range(count):
            state = {name: params[i][k].detach().clone() for i, name in enumerate(self.param_names)}
            loss = float(loss_sums[k]) / max(sizes[k] * epochs, 1)
            result = TrainResult(state={name: state[name] for name in self.state_names}, loss=loss,
                                 num_samples=sizes[k], steps=totals[k])
            fresh = clients[k].optimizer_state is None and totals[k] == 0
            results.append(CohortResult(result, None if fresh else self._arrays(exp_avg, exp_avg_sq, steps, k)))
        return results

    def _step_keys(self, generator: torch.Generator) -> tuple[torch.Tensor | None, ...]:
        """One step's (quantizer, gradient, weight) keys of a client, in the sequential path's order."""
        quantizer = _draw_keys(generator, len(self.key_names)) if self.stochastic_quantizers else None
        grad = weight = None
        if self.grad_format is not None and self.grad_format.rounding == "stochastic":
            grad = _draw_keys(generator, len(self.param_names))
        if self.weight_format is not None and self.weight_format.rounding == "stochastic":
            weight = _draw_keys(generator, len(self.param_names))
        return quantizer, grad, weight

    def _gradients(self, params: list[torch.Tensor], active: list[int], batches: dict[int, torch.Tensor],
                   keys: dict[int, tuple], xs: list[torch.Tensor], ys: list[torch.Tensor],
                   loss_sums: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """Gradients of the active clients' batch losses (rows of the others are not used); adds each
        client's ``loss * batch size`` to ``loss_sums``.

        Eager, clients whose batches differ in size run as separate vmapped groups. Compiled, every
        step has one shape, so nothing recompiles: all clients take part, a short batch is padded
        with zero-weight copies of its own samples (the same loss, gradients and per-tensor
        activation maxima) and a client that is done gets a zero-weight batch.
        """
        grads = None  # allocated only when the clients run as several groups
        if self._vloss.active:
            groups = {batch_size: list(range(params[0].shape[0]))}
        else:
            groups = {}
            for k in active:
                groups.setdefault(int(batches[k].shape[0]), []).append(k)
        for size, members in groups.items():
            index = torch.tensor(members, device=params[0].device)
            leaves = [p if len(members) == p.shape[0] else p.index_select(0, index) for p in params]
            leaves = [leaf.detach().requires_grad_() for leaf in leaves]
            inputs = self._inputs(members, batches, keys, xs, ys, size)
            losses, step_grads = self._loss_and_grads(leaves, *inputs)
            counts = inputs[-1].sum(dim=1).to(torch.float64)  # real samples per client (0: done)
            loss_sums.index_add_(0, index, losses.detach().to(torch.float64).nan_to_num() * counts)
            if len(members) == params[0].shape[0]:  # one group of every client: its gradients as they are
                return list(step_grads)
            grads = grads or [torch.zeros_like(p) for p in params]
            for g, leaf_grad in zip(grads, step_grads):
                g.index_copy_(0, index, leaf_grad)
        return grads

    def _inputs(self, members: list[int], batches: dict[int, torch.Tensor], keys: dict[int, tuple],
                xs: list[torch.Tensor], ys: list[torch.Tensor], size: int) -> tuple:
        """``(quantizer keys by name, x, y, weight)`` of ``members`` for one step, batches padded to
        ``size`` rows with zero-weight copies of each client's own samples."""
        dev = xs[0].device
        rows, weights, key_rows = [], [], []
        for k in members:
            batch = batches.get(k)
            real = 0 if batch is None else int(batch.shape[0])
            if batch is None:
                batch = torch.arange(size, device=dev) % max(int(ys[k].shape[0]), 1)
            rows.append(batch[torch.arange(size, device=dev) % batch.shape[0]])
            weights.append((torch.arange(size, device=dev) < real).to(torch.float32))
            if self.key_names:
                key_rows.append(keys[k][0] if k in keys else torch.zeros(len(self.key_names), dtype=torch.int32))
        named_keys = {}
        if self.key_names:
            table = torch.stack(key_rows).to(dev)
            named_keys = {name: table[:, j] for j, name in enumerate(self.key_names)}
        x = torch.stack([xs[k][r] for k, r in zip(members, rows)])
        y = torch.stack([ys[k][r] for k, r in zip(members, rows)])
        return named_keys, x, y, torch.stack(weights)

    def _loss_and_grads(self, leaves: list[torch.Tensor], keys: dict, x: torch.Tensor, y: torch.Tensor,
                        weight: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each client's loss (``K``) and the gradients of their sum. The first compiled step is
        repeated eagerly and kept only if the two agree (the sequential path's tolerances,
        :meth:`LocalTrainer._checked_step`); otherwise the cohort continues eagerly, with a warning."""
        losses = self._vloss(dict(zip(self.param_names, leaves)), keys, x, y, weight)
        grads = torch.autograd.grad(losses.sum(), leaves)
        if self._step_checked or not self._vloss.active:
            return losses, grads
        self._step_checked = True
        eager = self._vloss.fn(dict(zip(self.param_names, leaves)), keys, x, y, weight)
        eager_grads = torch.autograd.grad(eager.sum(), leaves)
        flat = torch.cat([g.reshape(-1) for g in grads])
        why = (mismatch(losses.detach(), eager.detach(), STEP_LOSS_TOLERANCE, floor=STEP_LOSS_FLOOR)
               or mismatch(flat, torch.cat([g.reshape(-1) for g in eager_grads]), STEP_GRAD_TOLERANCE))
        if why is not None:
            self._vloss.disable(f"torch.compile gave a wrong cohort step on {self.device} ({why})")
            return eager, eager_grads
        return losses, grads

    @torch.no_grad()
    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                exp_avg_sq: list[torch.Tensor], steps: torch.Tensor, active: list[int], keys: dict[int, tuple],
                lr: float, prox_mu: float, anchors: list[torch.Tensor] | None) -> None:
        """The low-precision optimizer step of the active clients, in place: (FedProx term), quantize
        gradients, Adam, quantize weights. The other clients' weights and Adam state do not move."""
        everyone = len(active) == params[0].shape[0]
        index = torch.tensor(active, device=params[0].device)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if everyone else t.index_select(0, index)

        weights, moments, squares = [rows(p) for p in params], [rows(m) for m in exp_avg], [rows(v) for v in exp_avg_sq]
        gradients = [rows(g) for g in grads]
        if anchors is not None:
            gradients = [g.add_(w - rows(a), alpha=2.0 * prox_mu) for g, w, a in zip(gradients, weights, anchors)]
        if self.grad_format is not None:
            gradients = self._quantized(gradients, self.grad_format, active, keys, 1)
        rows_cpu = torch.tensor(active)
        steps[rows_cpu] += 1
        new = self._adam(weights, gradients, moments, squares, steps[rows_cpu], lr)
        if self.weight_format is not None:
            new = self._quantized(new, self.weight_format, active, keys, 2)
        for p, m, v, w, mm, vv in zip(params, exp_avg, exp_avg_sq, new, moments, squares):
            if everyone:
                p.copy_(w)
            else:
                p.index_copy_(0, index, w)
                m.index_copy_(0, index, mm)
                v.index_copy_(0, index, vv)

    def _quantized(self, tensors: list[torch.Tensor], fmt: BFPFormat, active: list[int], keys: dict[int, tuple],
                   slot: int) -> list[torch.Tensor]:
        """Each stacked tensor quantized per client, with key ``keys[k][slot][i]`` for client k, tensor i."""
        if fmt.rounding != "stochastic":
            return [quantize_with_key(t, fmt, None, cohort=True) for t in tensors]
        table = torch.stack([keys[k][slot] for k in active]).to(tensors[0].device)
        return [quantize_with_key(t, fmt, table[:, i], cohort=True) for i, t in enumerate(tensors)]

    def _arrays(self, exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor], steps: torch.Tensor,
                k: int) -> OptimizerArrays:
        """Client ``k``'s Adam state as :data:`~lptfl.fl.client_state.OptimizerArrays`."""
        return {"exp_avg": torch.cat([m[k].reshape(-1) for m in exp_avg]).cpu().numpy(),
                "exp_avg_sq": torch.cat([v[k].reshape(-1) for v in exp_avg_sq]).cpu().numpy(),
                "step": steps[k].numpy().copy()}
