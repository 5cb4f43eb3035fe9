"""The server side of ``--aggregation_mode`` and ``--server_optimizer``, shared by the
in-process simulator and the Flower ServerApp.

It installs its hooks on a :class:`lptfl.fl.Server` (entries kept on the clients for FedBN, ABAvg's
scorer, a server optimizer, FedGen's and FedFTG's observers and FedFTG's refinement) and does
the per-round server work (FedGen's generator training). The drivers hand it the label counts
that come with each update (:meth:`ServerAlgorithm.report_counts`) before ``Server.receive``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lptfl import codec
from lptfl.fl.algorithms import batchnorm_names
from lptfl.fl.fedftg import FedFTGServer
from lptfl.fl.fedgen import FedGenServer
from lptfl.fl.server import Server, full_precision_names
from lptfl.fl.seeds import FEDFTG_TAG, FEDGEN_TAG
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.quant import BFPFormat

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class ServerAlgorithm:
    """Server-side state and hooks of the run's FL algorithm.

    Args:
        config: the run's settings (a :class:`lptfl.experiment.config.RunConfig`).
        server: the aggregation server to configure.
        model: the run's model (names of its parameters and batch norms, its classifier head).
        num_classes: classes of the task.
        input_shape: ``(channels, height, width)`` of its inputs.
        make_fp32_model: builds a fresh full-precision model (FedFTG's student and teachers).
        seed_for: derives a seed from the run's seed and integers.
        scorer: ABAvg's ``state -> weight`` (required for ``abavg``).
    """

    def __init__(self, config, server: Server, model: nn.Module, *, num_classes: int,
                 input_shape: tuple[int, int, int], make_fp32_model: Callable[[], nn.Module],
                 seed_for: Callable[..., int], scorer: Callable[[State], float] | None = None) -> None:
        self.mode = config.aggregation_mode
        self.server = server
        self.seed_for = seed_for
        self.counts: dict[int, torch.Tensor] = {}
        self.fedgen: FedGenServer | None = None
        self.fedftg: FedFTGServer | None = None
        self._accepted: list[tuple[State, torch.Tensor]] = []  # (decoded update, label counts)
        local = batchnorm_names(model) if self.mode == "fedbn" else []
        if self.mode == "fedbn" and not local:
            log.warning("--aggregation_mode fedbn: the model has no batch-norm layer, so it runs as FedAvg "
                        "(use --model_name resnet8 or --model_norm batchnorm)")
        if self.mode == "abavg" and scorer is None:
            raise ValueError("--aggregation_mode abavg needs server-held validation data (a scorer)")
        optimizer = None
        if config.server_optimizer != "none":
            params = [n for n, _ in model.named_parameters() if n not in local]
            optimizer = ServerOptimizer(
                config.server_optimizer, params, lr=config.server_lr, momentum=config.server_momentum,
                beta1=config.server_beta1, beta2=config.server_beta2, tau=config.server_tau)
        if self.mode == "fedgen":
            self.fedgen = FedGenServer(num_classes, model.classifier.in_features, config.fedgen_config(),
                                       seed=seed_for(FEDGEN_TAG))
        if self.mode == "fedftg":
            self.fedftg = FedFTGServer(make_fp32_model, num_classes, input_shape, config.fedftg_config(),
                                       seed=seed_for(FEDFTG_TAG))
        server.install(keep_local=local, scorer=scorer if self.mode == "abavg" else None, optimizer=optimizer,
                       on_accept=self._accept if self.needs_label_counts else None,
                       refine=self._refine if self.fedftg is not None else None)

    @property
    def needs_label_counts(self) -> bool:
        """Whether clients must report their label counts with their updates."""
        return self.fedgen is not None or self.fedftg is not None

    def begin_round(self) -> None:
        self.counts = {}
        self._accepted = []

    def report_counts(self, client: int, counts: torch.Tensor) -> None:
        """The label counts that came with client ``client``'s update this round."""
        self.counts[int(client)] = counts.to(torch.int64).reshape(-1)

    def _accept(self, client: int | str, state: State, _num_samples: int) -> None:
        counts = self.counts.get(int(client))
        if counts is None:
            log.warning("client %s sent no label counts; its model is left out of the %s ensemble", client, self.mode)
            return
        if self.fedgen is not None:
            state = {k: v for k, v in state.items() if k.startswith("classifier.")}
        self._accepted.append((state, counts))

    def _refine(self, aggregate: State) -> State:
        states = [{**aggregate, **state} for state, _ in self._accepted]
        generator = torch.Generator().manual_seed(self.seed_for(self.server.round, FEDFTG_TAG))
        return self.fedftg.refine(aggregate, states, [c for _, c in self._accepted], generator)

    def generator_payload(self, fmt: BFPFormat | None) -> bytes | None:
        """FedGen: the generator encoded in ``fmt`` (what travels with the downlink); else None."""
        if self.fedgen is None:
            return None
        generator = self.fedgen.generator
        return codec.encode(generator.state_dict(), fmt, full_precision=full_precision_names(generator))

    def fedgen_round(self, round_index: int) -> tuple[float, float, list[int]]:
        """FedGen's ``(alpha_t, beta_t, labels the generator knows)`` for round ``round_index``."""
        alpha, beta = self.fedgen.coefficients(round_index)
        return alpha, beta, [int(c) for c in self.fedgen.labels]

    def end_round(self) -> None:
        """After the server aggregated: FedGen trains its generator on the round's heads."""
        if self.fedgen is not None and self._accepted:
            heads = [(s["classifier.weight"], s["classifier.bias"]) for s, _ in self._accepted]
            generator = torch.Generator().manual_seed(self.seed_for(self.server.round, FEDGEN_TAG))
            self.fedgen.train(heads, [c for _, c in self._accepted], generator)
        self._accepted = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep, as flat tensors: FedGen's / FedFTG's generators and their
        optimizers (the server optimizer's state is the :class:`Server`'s)."""
        out: dict[str, torch.Tensor] = {}
        for part in (self.fedgen, self.fedftg):
            out.update(part.state_dict() if part is not None else {})
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for part in (self.fedgen, self.fedftg):
            if part is not None:
                part.load_state_dict(tensors)
