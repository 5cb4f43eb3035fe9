"""Client side of :class:`lptfl.flower.LowPrecisionFedAvg` for any Flower ``ClientApp``.

One call per message, with the user's own model and data::

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_low_precision(msg, context, Net(), (x, y), policy=PrecisionPolicy.low_precision(8))

:func:`train_low_precision` decodes the downlink (the packed bytes of :mod:`lptfl.codec`),
puts the policy's activation/error quantizers into the model, trains with the low-precision
optimizer (:class:`lptfl.fl.LocalTrainer`), keeps the optimizer state in ``context.state``
between rounds, encodes the trained model in the policy's uplink format and returns the
reply. :func:`evaluate_low_precision` decodes the downlink and scores it. The loss is
cross-entropy over the model's logits (classification). Extra loss terms (``objective``,
e.g. FedGen's), entries that stay on the node (``keep_local``, e.g. FedBN's batch norm) and
extra reply metrics let an FL algorithm's client side use the same call (lptfl's own
ClientApp, :mod:`lptfl.flower.client_app`, does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from torch import nn
from torch.utils.data import DataLoader

from lptfl import codec
from lptfl.fl import LocalTrainer, arguments, evaluate, full_precision_names
from lptfl.fl.algorithms import proximal_regularizer
from lptfl.fl.client import LocalObjective
from lptfl.flower.local_state import load_local_state, save_local_state
from lptfl.flower.optimizer_state import load_optimizer_state, save_optimizer_state
from lptfl.flower.payload import MODEL_RECORD_KEY, UPLINK_FORMAT_KEY, format_label, from_record, to_record
from lptfl.quant import PrecisionPolicy

Data = Union[tuple[torch.Tensor, torch.Tensor], DataLoader]
"""Inputs ``n x ...`` (float) and integer labels ``n``, or a DataLoader yielding ``(x, y)`` batches."""

METRICS_RECORD = "metrics"
REPLY_METRICS = ("num-examples", "train-loss", "bytes-down", "bytes-up", "state-restored")
"""The keys :func:`train_low_precision` puts in its reply's MetricRecord (``metrics`` may add others)."""
DEFAULT_BATCH_SIZE = 32


def as_tensors(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from tensors, or from one pass over a DataLoader (its batches concatenated;
    the helpers then shuffle and batch with their own seeded generator).
    Inputs become float32 ``n x ...``, labels int64 ``n``.

    Raises:
        TypeError: ``data`` is neither a pair of tensors nor a DataLoader of ``(x, y)`` batches,
            the inputs are not floating point (raw bytes: convert and normalise them first), or
            the labels are not integer class indices of shape ``n``.
        ValueError: x and y disagree in length, there are no samples, or x holds NaN or inf.
    """
    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"the DataLoader must yield (x, y) pairs, got {type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("the DataLoader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    else:
        raise TypeError(f"data must be a pair of tensors (x, y) or a DataLoader, got {type(data).__name__}")
    if x.dim() == 0 or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor n x ..., got {x.dtype} of shape {tuple(x.shape)} "
                        "(convert and normalise raw values first, e.g. x.float() / 255)")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices of shape (n,), got {y.dtype} of shape {tuple(y.shape)} "
                        "(one-hot labels: y.argmax(1))")
    if x.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"x has {x.shape[0]} rows and y {y.shape[0]}; expected the same number, at least 1")
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # the sum first: no n x ... mask
        raise ValueError("x holds NaN or infinite values; clean or drop those rows")
    return x.float(), y.long()


def _downlink(msg: Message) -> tuple[str, bytes]:
    """``(record key, payload)`` of the packed model: the ArrayRecord the config names
    (:data:`~lptfl.flower.payload.MODEL_RECORD_KEY`), else the message's single one."""
    records = msg.content.array_records
    key = _config(msg).get(MODEL_RECORD_KEY)
    if key is None:
        if len(records) != 1:
            raise ValueError(f"expected one ArrayRecord (the lptfl downlink) in the message, got {sorted(records)}")
        key = next(iter(records))
    if key not in records:
        raise ValueError(f"the config names the model record {key!r}, but the message holds {sorted(records)}")
    return key, from_record(records[key])


def _config(msg: Message) -> Mapping:
    records = msg.content.config_records
    return next(iter(records.values())) if len(records) == 1 else {}


def _decode_for(state: Mapping[str, torch.Tensor], down: bytes, *,
                skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The downlink's state, checked against this client's model ``state`` but the entries in ``skip``.

    Raises:
        lptfl.codec.PayloadError: it does not decode to that state (the message says which side is which).
    """
    expect = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if k not in skip}
    try:
        return codec.decode(down, expect=expect)
    except codec.PayloadError as err:
        raise codec.PayloadError(f"the server's model does not decode to this client's model ('expected' is this "
                                 f"client's, 'got' the server's): {err}") from None


def _round_seed(context: Context, server_round: int, seed: int | None) -> int:
    """``seed``, or one derived from the node id and the round (stable across reruns)."""
    if seed is not None:
        return seed
    words = np.random.SeedSequence([int(context.node_id) & (2**63 - 1), int(server_round)]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def train_low_precision(
    msg: Message,
    context: Context,
    model: nn.Module,
    train_data: Data,
    *,
    policy: PrecisionPolicy,
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float = 1e-3,
    optimizer: str = "adam",
    keep_optimizer_state: bool = True,
    compress: bool = False,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    compile_mode: str = "default",
    keep_local: Iterable[str] = (),
    objective: LocalObjective | None = None,
    metrics: Mapping[str, MetricRecordValues] | None = None,
) -> Message:
    """Train ``model`` on ``train_data`` from the downlink in ``msg``; the reply with the update.

    Args:
        msg: a train message of :class:`~lptfl.flower.LowPrecisionFedAvg` (its single
            ArrayRecord holds the packed downlink; its config may hold ``proximal-mu``).
        context: the node's context; its ``state`` keeps the optimizer state between rounds.
        model: the architecture, any ``nn.Module`` whose ``state_dict`` matches the server's
            model. Changed in place: quantizers are inserted and the weights trained.
        train_data: ``(x, y)`` tensors or a DataLoader of ``(x, y)`` batches.
        policy: word lengths, layouts and rounding of weights, gradients, activations,
            errors and the uplink (e.g. ``PrecisionPolicy.low_precision(8)``); its uplink
            format must be the one the strategy accepts.
        epochs: local epochs.
        batch_size: mini-batch size (None: the DataLoader's, else 32).
        lr: the local optimizer's learning rate.
        optimizer: ``"adam"`` (the paper's), ``"sgd"`` (plain) or ``"sgd-momentum"``.
        keep_optimizer_state: keep the optimizer state in ``context.state`` and resume from
            it in the node's next round (the paper's persistent local state).
        compress: zstd-compress the uplink payload (lossless).
        seed: seeds shuffling and stochastic rounding (None: derived from the node id and
            the server round).
        device: where training runs.
        compile: fuse the training step with ``torch.compile`` (checked against eager once).
        compile_mode: ``torch.compile``'s mode.
        keep_local: state entries that never leave the node (FedBN: the batch norm). They are
            neither expected in the downlink nor sent up; the node keeps them in
            ``context.state`` (the model's own values before its first round).
        objective: extra loss terms with their own inputs (e.g. FedGen's generated features).
        metrics: extra values for the reply's MetricRecord (e.g. the client's label counts); none of
            :data:`REPLY_METRICS`.

    Returns:
        The reply: the packed update in an ArrayRecord under the downlink's key, and a
        MetricRecord ``"metrics"`` with ``num-examples``, ``train-loss`` (mean cross-entropy,
        nats), ``bytes-down`` and ``bytes-up`` (payload lengths), ``state-restored`` (0/1)
        and ``metrics``.

    Raises:
        TypeError: an argument has the wrong type (named in the message), or the data are not
            float inputs with integer labels.
        ValueError: the server accepts another uplink format than ``policy.uplink``, the
            message holds no single ArrayRecord, ``metrics`` redefines one of
            :data:`REPLY_METRICS`, an argument is out of range, or the data are malformed.
        lptfl.codec.PayloadError: the downlink does not decode to ``model``'s state.
    """
    arguments.precision_policy(policy)
    epochs = arguments.integer("epochs", epochs, minimum=1)
    if batch_size is not None:
        batch_size = arguments.integer("batch_size", batch_size, minimum=1)
    lr = arguments.number("lr", lr, low=0.0, low_open=True)
    if seed is not None:
        seed = arguments.integer("seed", seed)
    local = set(arguments.names("keep_local", keep_local))
    clash = sorted(set(metrics or {}) & set(REPLY_METRICS))
    if clash:
        raise ValueError(f"metrics may not redefine {clash}: train_low_precision sets them")
    config = _config(msg)
    announced = config.get(UPLINK_FORMAT_KEY)
    if announced is not None and announced != format_label(policy.uplink):
        raise ValueError(f"the server accepts uplinks in {announced}, this client's policy sends "
                         f"{format_label(policy.uplink)}; use the server's precision policy")
    try:
        key, down = _downlink(msg)
    except codec.PayloadError as err:
        if announced is not None:  # sent by LowPrecisionFedAvg: the payload itself is bad
            raise
        raise codec.PayloadError(f"{err}; the message lacks lptfl's train config, so the ServerApp's strategy is "
                                 "not lptfl.flower.LowPrecisionFedAvg") from None
    x, y = as_tensors(train_data)
    if batch_size is None:
        loader_batch = train_data.batch_size if isinstance(train_data, DataLoader) else None
        batch_size = loader_batch or DEFAULT_BATCH_SIZE
    initial = model.state_dict()
    unknown = sorted(local - set(initial))
    if unknown:
        raise ValueError(f"keep_local names entries that are not in the model's state: {unknown}")
    full_precision = [k for k in full_precision_names(model) if k not in local]
    start = _decode_for(initial, down, skip=local)
    if local:
        start.update(load_local_state(context.state, {k: initial[k] for k in local}))
    trainer = LocalTrainer(model, policy, optimizer=optimizer, lr=lr, example_input=x[:batch_size],
                           compile=compile, compile_mode=compile_mode, device=device)
    restored = keep_optimizer_state and load_optimizer_state(trainer.inner, context.state)
    server_round = int(config.get("server-round", 0))
    generator = torch.Generator().manual_seed(_round_seed(context, server_round, seed))
    mu = float(config.get("proximal-mu", 0.0))
    # Flower's FedProx adds (mu / 2) ||w - w_global||^2; lptfl's term is mu' ||w - w_global||^2
    regularizer = proximal_regularizer(trainer.model, start, mu / 2) if mu > 0 else None
    result = trainer.train(start, x, y, epochs=epochs, batch_size=batch_size, generator=generator,
                           regularizer=regularizer, objective=objective)
    diverged = result.diverged_entry()
    if diverged is not None:  # no payload can carry it; the node keeps its state from before the round
        raise ValueError(f"training diverged in round {server_round}: {diverged!r} holds NaN or infinite values "
                         f"(a lower lr than {lr:g} may help)")
    if keep_optimizer_state:
        save_optimizer_state(trainer.inner, context.state)
    if local:
        save_local_state(context.state, {k: result.state[k] for k in local})
    shared = {k: v for k, v in result.state.items() if k not in local}
    up = codec.encode(shared, policy.uplink, full_precision=full_precision, compress=compress)
    values = dict(zip(REPLY_METRICS, (int(result.num_samples), float(result.loss), len(down), len(up),
                                      int(restored)), strict=True))
    values.update(metrics or {})
    return Message(RecordDict({key: to_record(up), METRICS_RECORD: MetricRecord(values)}), reply_to=msg)


def evaluate_low_precision(
    msg: Message,
    model: nn.Module,
    test_data: Data,
    *,
    policy: PrecisionPolicy,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> Message:
    """Score the downlink model of ``msg`` on ``test_data``; the reply with the metrics.

    Args:
        msg: an evaluate message of :class:`~lptfl.flower.LowPrecisionFedAvg`.
        model: the architecture (quantizers are inserted in place).
        test_data: ``(x, y)`` tensors or a DataLoader of ``(x, y)`` batches.
        policy: the activations' precision during scoring (its activation format; pass
            ``PrecisionPolicy.full_precision()`` to score in fp32).
        batch_size: rows per forward pass.
        device: where scoring runs.

    Returns:
        The reply: a MetricRecord ``"metrics"`` with ``num-examples``, ``eval-loss`` (mean
        cross-entropy, nats), ``eval-acc`` (fraction 0-1) and ``bytes-down``.

    Raises:
        TypeError / ValueError: a wrong ``policy`` or ``batch_size``, or malformed data.
        lptfl.codec.PayloadError: the downlink does not decode to ``model``'s state.
    """
    arguments.precision_policy(policy)
    arguments.integer("batch_size", batch_size, minimum=1)
    _, down = _downlink(msg)
    x, y = as_tensors(test_data)
    state = _decode_for(model.state_dict(), down)
    model.to(device)
    policy.prepare_model(model, x[:batch_size].to(device))
    model.load_state_dict(state)
    loss, accuracy = evaluate(model, x, y, batch_size=batch_size)
    metrics = MetricRecord({"num-examples": int(y.shape[0]), "eval-loss": loss, "eval-acc": accuracy,
                            "bytes-down": len(down)})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


__all__ = ["Data", "as_tensors", "evaluate_low_precision", "train_low_precision"]
