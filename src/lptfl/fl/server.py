"""The server: high-precision aggregation, the moving average, the downlink (REFERENCE §1).

Round r: the served model (the moving average once it exists, else the global model) is
quantized and encoded for the sampled clients; their encoded updates are decoded,
validated and summed in float64; the mean becomes the global model ``w``; from round
``ma_start`` on, ``wbar = lambda * wbar + (1 - lambda) * w`` (the first average is a plain
copy of ``w``). The served model is the one evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lptfl import codec
from lptfl.fl import arguments
from lptfl.fl.aggregate import RunningMean, State, moving_average
from lptfl.fl.robust import ROBUST_MODES, CoordinateWise, update_distance
from lptfl.fl.seeds import DOWNLINK_TAG
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.quant import BFPFormat

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "samples")
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes codec.encode quantizes


@dataclass
class ServerConfig:
    """Aggregation settings.

    Attributes:
        moving_average: keep the server moving average (the paper's paradigm).
        moving_weight: lambda of the moving average.
        ma_start: first round (1-based) whose global model enters the average.
        weighting: ``"uniform"`` (unweighted mean over the clients that replied, as the
            published code) or ``"samples"`` (weighted by client data size, the paper's formula).
        downlink: format of the served model on the wire (None: fp32). With stochastic
            rounding, round r's downlink is rounded with a generator seeded from ``(seed, r)``:
            every client of a round gets the same model, and a resumed run the same rounding.
        uplink: format the clients use. When set, an update whose quantizable tensors
            (float32/16, bfloat16, not ``full_precision``) are not in this format, or whose
            ``full_precision`` entries are not sent raw, is rejected (None: no format check).
        max_payload_bytes: uplink payloads larger than this are rejected unread.
        min_clients: a round with fewer accepted updates is skipped (models unchanged).
        max_update_norm: reject an update whose L2 distance from the served model exceeds
            this (None: no limit).
        robust: ``"none"`` (running weighted mean), ``"median"`` or ``"trimmed_mean"``
            (coordinate-wise, unweighted; holds the round's updates).
        trim_fraction: fraction dropped at each end by ``"trimmed_mean"``.
        seed: the run's seed (the downlink's stochastic rounding).
    """

    moving_average: bool = False
    moving_weight: float = 0.9
    ma_start: int = 1
    weighting: str = "uniform"
    downlink: BFPFormat | None = None
    uplink: BFPFormat | None = None
    max_payload_bytes: int = 1 << 30
    min_clients: int = 1
    max_update_norm: float | None = None
    robust: str = "none"
    trim_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting (TypeError for a wrong type, ValueError for a wrong value, one line
        naming it) and store numbers as Python ints and floats."""
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.robust not in ROBUST_MODES:
            raise ValueError(f"robust must be one of {ROBUST_MODES}, got {self.robust!r}")
        for name in ("downlink", "uplink"):
            arguments.instance(name, getattr(self, name), BFPFormat, "BFPFormat(8)", optional=True)
        arguments.flag("moving_average", self.moving_average)
        self.moving_weight = arguments.number("moving_weight", self.moving_weight, low=0.0, high=1.0, high_open=True)
        self.ma_start = arguments.integer("ma_start", self.ma_start, minimum=1)
        self.max_payload_bytes = arguments.integer("max_payload_bytes", self.max_payload_bytes, minimum=1)
        self.min_clients = arguments.integer("min_clients", self.min_clients, minimum=1)
        if self.max_update_norm is not None:
            self.max_update_norm = arguments.number("max_update_norm", self.max_update_norm, low=0.0, low_open=True)
        self.trim_fraction = arguments.number("trim_fraction", self.trim_fraction, low=0.0, high=0.5, high_open=True)
        self.seed = arguments.integer("seed", self.seed)


@dataclass
class RoundStats:
    """What the server saw in one round."""

    accepted: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    rejected_norm: int = 0
    skipped: bool = False
    weights: list[float] = field(default_factory=list)


def full_precision_names(model: torch.nn.Module) -> list[str]:
    """State entries sent exactly: floating buffers such as batch-norm running statistics."""
    params = {name for name, _ in model.named_parameters()}
    return [name for name, value in model.state_dict().items() if name not in params and value.is_floating_point()]


class Server:
    """Holds the global model and moving average; aggregates encoded client updates.

    Args:
        initial: initial global state dict (float tensors are kept fp32).
        config: aggregation settings.
        full_precision: state names sent without quantization (see :func:`full_precision_names`).
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], config: ServerConfig, *, full_precision: list[str]) -> None:
        self.config = config
        self.full_precision = list(full_precision)
        self.global_state: State = {k: v.detach().clone() for k, v in initial.items()}
        self.average_state: State | None = None
        self.round = 0
        self.install()
        self._mean: RunningMean | CoordinateWise | None = None
        self._reference: State | None = None
        self.stats = RoundStats()

    def served_state(self) -> State:
        """The model clients start from and that is evaluated: ``wbar`` if it exists, else ``w``."""
        return self.average_state if self.average_state is not None else self.global_state

    def downlink(self) -> bytes:
        """The encoded served model of the next round, quantized with the downlink format."""
        state = self.served_state()
        if self.local_names:
            state = {k: v for k, v in state.items() if k not in self.local_names}
        full_precision = [k for k in self.full_precision if k in state]
        fmt, generator = self.config.downlink, None
        if fmt is not None and fmt.rounding == "stochastic":
            seed = np.random.SeedSequence([self.config.seed, self.round + 1, DOWNLINK_TAG]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
        return codec.encode(state, fmt, full_precision=full_precision, generator=generator)

    def install(self, *, keep_local: Iterable[str] = (), scorer: Callable[[State], float] | None = None,
                optimizer: ServerOptimizer | None = None,
                on_accept: Callable[[int | str, State, int], None] | None = None,
                refine: Callable[[State], State] | None = None) -> None:
        """Set the FL algorithm's hooks (each call replaces them all): ``keep_local``, state entries that
        stay on the clients (FedBN: left out of the downlink, expected absent from the uplink, never
        aggregated); ``scorer``, each decoded update's aggregation weight (ABAvg); ``optimizer``, turning
        ``(served, mean)`` into the new global model (FedOpt); ``on_accept``, seeing each accepted update
        ``(client, state, samples)`` (FedGen, FedFTG); ``refine``, changing the aggregate before the moving
        average (FedFTG's fine-tuning)."""
        self.local_names = frozenset(keep_local)
        self._expect = {k: (tuple(v.shape), v.dtype) for k, v in self.global_state.items() if k not in self.local_names}
        self._formats = self._uplink_formats()
        self._scorer, self._optimizer, self._on_accept, self._refine = scorer, optimizer, on_accept, refine

    def state_dict(self) -> State:
        """CPU copies of the global model (``global.<name>``), the moving average while there is one
        (``average.<name>``), the round (``round``, int64) and the server optimizer's state
        (``optimizer.<name>``)."""
        out = {f"global.{k}": v for k, v in self.global_state.items()}
        out.update({f"average.{k}": v for k, v in (self.average_state or {}).items()})
        out.update({f"optimizer.{k}": v for k, v in (self._optimizer.state_dict() if self._optimizer else {}).items()})
        out["round"] = torch.tensor(self.round, dtype=torch.int64)
        return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned, on the model's device.

        Raises:
            ValueError: the global model or the average has other tensors, shapes or dtypes than this
                server's model (nothing is changed then).
        """
        device = next(iter(self.global_state.values())).device
        parts: dict[str, State] = {"global": {}, "average": {}, "optimizer": {}}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if part in parts:
                parts[part][name] = value.to(device)
        model = {k: (v.shape, v.dtype) for k, v in self.global_state.items()}
        for label in ("global", "average"):
            found = {k: (v.shape, v.dtype) for k, v in parts[label].items()}
            if found != model and (found or label == "global"):
                wrong = sorted(k for k in model.keys() | found.keys() if found.get(k) != model.get(k))
                raise ValueError(f"the {label} state does not match the model of this run in {wrong[:5]} (missing, "
                                 "unexpected, or of another shape or dtype)")
        order = list(self.global_state)  # the model's order: the wire format, and so the byte counts, follow it
        self.global_state = {k: parts["global"][k] for k in order}
        self.average_state = {k: parts["average"][k] for k in order} if parts["average"] else None
        self.round = int(state["round"])
        if self._optimizer is not None:
            self._optimizer.load_state_dict(parts["optimizer"])

    def _uplink_formats(self) -> dict[str, BFPFormat | None] | None:
        """The number format each expected uplink tensor must travel in (None: not checked)."""
        fmt = self.config.uplink
        if fmt is None:
            return None
        keep = set(self.full_precision)
        return {name: fmt if dtype in _QUANTIZABLE and name not in keep else None
                for name, (_, dtype) in self._expect.items()}

    def begin_round(self) -> None:
        cfg = self.config
        self._mean = RunningMean() if cfg.robust == "none" else CoordinateWise(cfg.robust, cfg.trim_fraction)
        self._reference = self.served_state()
        self.stats = RoundStats()

    def receive(self, payload: bytes, num_samples: int, client: int | str = "?") -> bool:
        """Decode, validate and add one client's update. A bad payload is logged, counted and skipped."""
        if self._mean is None:
            raise RuntimeError("receive() called outside a round; call begin_round() first")
        self.stats.bytes_up.append(len(payload))
        try:
            state = codec.decode(payload, expect=self._expect, formats=self._formats,
                                 max_bytes=self.config.max_payload_bytes)
        except codec.PayloadError as err:
            self.reject(client, str(err))
            return False
        if self.config.max_update_norm is not None and self._reference is not None:
            distance = update_distance(state, self._reference)
            if not distance <= self.config.max_update_norm:
                self.stats.rejected_norm += 1
                self.reject(client, f"update norm {distance:.4g} exceeds --max_update_norm "
                                    f"{self.config.max_update_norm:g}")
                return False
        weight = float(num_samples) if self.config.weighting == "samples" else 1.0
        if self._scorer is not None:
            weight = float(self._scorer(state))
        self.stats.weights.append(weight)
        self._mean.add(state, weight if weight > 0 else 1.0)
        self.stats.accepted += 1
        if self._on_accept is not None:
            self._on_accept(client, state, num_samples)
        return True

    def reject(self, client: int | str, reason: str) -> None:
        """Count a client of this round whose update is refused, for ``reason`` (logged)."""
        self.stats.rejected += 1
        self.stats.reasons.append(f"client {client}: {reason}")
        log.warning("rejected the update of client %s: %s", client, reason)

    def end_round(self) -> bool:
        """Aggregate what arrived; update the moving average. False if no update was accepted
        (then the models stay as they were)."""
        if self._mean is None:
            raise RuntimeError("end_round() called outside a round")
        self.round += 1
        mean, self._mean = self._mean, None
        if mean.count < max(1, self.config.min_clients):
            self.stats.skipped = True
            log.warning("round %d: %d valid update(s) arrived, fewer than the %d needed; the round is skipped "
                        "and the models are unchanged", self.round, mean.count, max(1, self.config.min_clients))
            return False
        aggregate = mean.result(self.global_state)
        if self._optimizer is not None and self._reference is not None:
            aggregate = self._optimizer.step(self._reference, aggregate)
        if self._refine is not None:
            aggregate = self._refine(aggregate)
        self.global_state = aggregate
        if self.config.moving_average and self.round >= self.config.ma_start:
            if self.average_state is None:
                self.average_state = {k: v.clone() for k, v in self.global_state.items()}
            else:
                self.average_state = moving_average(self.average_state, self.global_state, self.config.moving_weight)
        return True
