"""FedProx, FedBN, ABAvg and the server optimizers (lptfl.fl.algorithms, lptfl.fl.server_optim)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lptfl import codec
from lptfl.experiment.config import RunConfig
from lptfl.fl import LocalTrainer, Server, ServerConfig, full_precision_names
from lptfl.fl.algorithms import (
    LocalStateBank,
    accuracy_scorer,
    batchnorm_names,
    proximal_regularizer,
    validation_split,
    vote_accuracy,
)
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.models import ConvNet, resnet8
from lptfl.quant import PrecisionPolicy
from lptfl.sim.engine import Simulation

FAST = dict(compile="off", model_width=8, num_clients=4, frac=0.5, epochs=1, batch_size=32)


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def trainer_for(model):
    return LocalTrainer(model, PrecisionPolicy.full_precision(), optimizer="sgd", lr=0.1)


def distance(a, b):
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


# ---------------------------------------------------------------- FedProx


def test_fedprox_huge_mu_keeps_the_client_at_the_global_model_and_mu_zero_is_fedavg():
    torch.manual_seed(0)
    model = ConvNet(1, 3, 8, width=8, depth=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = toy_data()
    trainer = trainer_for(model)
    for group in trainer.inner.param_groups:  # plain SGD: the proximal pull is a contraction
        group["momentum"], group["lr"] = 0.0, 0.01

    def run(reg):
        trainer.inner.state.clear()
        return trainer.train(start, x, y, epochs=4, batch_size=8, generator=torch.Generator().manual_seed(1),
                             regularizer=reg).state

    plain = run(None)
    assert proximal_regularizer(model, start, 0.0) is None  # mu = 0: exactly the FedAvg step
    zero = run(lambda m: torch.zeros(()))  # the regularizer path itself with a zero term
    assert distance(zero, plain) < 1e-4
    # a huge mu (still lr * 2 mu < 1, else plain SGD diverges) pins the weights to the global ones:
    # 32 steps, and the client never gets farther than about one step from the global model
    term = proximal_regularizer(model, start, 45.0)
    prox = run(term)  # closed-form gradient added after the fused loss step
    assert distance(run(lambda m: term(m)), prox) < 1e-5  # = autograd through the term
    assert distance(prox, start) < 0.15 * distance(plain, start)
    value = proximal_regularizer(model, start, 2.0)(model)  # model now holds `prox`
    expected = 2.0 * sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- FedBN


def test_batchnorm_names_cover_parameters_and_statistics():
    names = batchnorm_names(ConvNet(1, 3, 8, width=8, depth=2, norm="batchnorm"))
    assert any(n.endswith("running_mean") for n in names) and any(n.endswith(".weight") for n in names)
    assert any(n.endswith("num_batches_tracked") for n in names)
    assert batchnorm_names(ConvNet(1, 3, 8, width=8, depth=2)) == []  # instance norm: nothing local


def test_fedbn_uplink_has_no_batchnorm_and_client_state_persists():
    torch.manual_seed(0)
    model = resnet8(1, 3, 8)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    bn = batchnorm_names(model)
    full = full_precision_names(model)
    server = Server(initial, ServerConfig(), full_precision=full)
    server.install(keep_local=bn)
    bank = LocalStateBank(bn, initial)
    trainer = trainer_for(model)
    down = codec.decode(server.downlink())
    assert not set(bn) & set(down)  # the downlink carries no batch norm either
    server.begin_round()
    kept = {}
    for client, seed in ((0, 0), (1, 1)):
        x, y = toy_data(seed=seed)
        result = trainer.train(bank.start(client, down), x, y, epochs=1, batch_size=16,
                               generator=torch.Generator().manual_seed(seed))
        sent = bank.keep(client, result.state)
        payload = codec.encode(sent, None, full_precision=[k for k in full if k in sent])
        assert not set(bn) & set(codec.decode(payload))
        assert server.receive(payload, len(y), client)
        kept[client] = {k: result.state[k].clone() for k in bn}
    assert server.end_round()
    for k in bn:  # never aggregated: the global model keeps its initial batch norm
        assert torch.equal(server.global_state[k], initial[k])
    # the next round starts each client from the new downlink plus its own batch norm
    start = bank.start(1, codec.decode(server.downlink()))
    for k in bn:
        assert torch.equal(start[k], kept[1][k])
    stat = next(k for k in bn if k.endswith("running_mean"))
    assert not torch.equal(kept[0][stat], kept[1][stat])  # each client has its own statistics
    assert torch.equal(bank.start(7, down)[bn[0]], initial[bn[0]])  # a new client: initial values


def test_vote_accuracy_is_the_majority_of_the_models():
    model = nn.Linear(2, 3, bias=False)
    x = torch.eye(2).view(2, 2)
    y = torch.tensor([0, 1])
    right = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}
    wrong = {"weight": torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])}
    assert vote_accuracy(model, [right, right, wrong], x, y, 3) == 1.0
    assert vote_accuracy(model, [right, wrong, wrong], x, y, 3) == 0.0


# ---------------------------------------------------------------- ABAvg


def test_abavg_validation_split_is_held_out():
    pool, val = validation_split(100, 0.05, seed=3)
    assert len(val) == 5 and len(pool) == 95 and not set(pool) & set(val)


def test_abavg_server_aggregate_is_accuracy_weighted():
    model = nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    perfect = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}  # accuracy 1
    half = {"weight": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}  # predicts class 1 always: accuracy 0.5
    server = Server({"weight": torch.zeros(2, 2)}, ServerConfig(), full_precision=[])
    server.install(scorer=accuracy_scorer(model, x, y))
    server.begin_round()
    for i, state in enumerate((perfect, half)):
        assert server.receive(codec.encode(state, None), 10, i)
    assert server.stats.weights == pytest.approx([1.0, 0.5])
    server.end_round()
    expected = (1.0 * perfect["weight"] + 0.5 * half["weight"]) / 1.5
    assert torch.allclose(server.global_state["weight"], expected)


# ---------------------------------------------------------------- server optimizers


def _round(server, states):
    server.begin_round()
    for i, s in enumerate(states):
        server.receive(codec.encode(s, None), 1, i)
    server.end_round()
    return server.global_state


@pytest.mark.parametrize("moving_average", [False, True])
def test_fedavgm_momentum_zero_lr_one_is_fedavg(moving_average):
    torch.manual_seed(0)
    init = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    cfg = ServerConfig(moving_average=moving_average)
    plain, opt = Server(init, cfg, full_precision=[]), Server(init, cfg, full_precision=[])
    opt.install(optimizer=ServerOptimizer("fedavgm", ["w", "b"], lr=1.0, momentum=0.0))
    for r in range(3):
        states = [{k: v + torch.randn_like(v) for k, v in init.items()} for _ in range(3)]
        _round(plain, states)
        _round(opt, states)
        for k in init:
            assert torch.allclose(plain.served_state()[k], opt.served_state()[k], atol=1e-6)


def test_fedavgm_momentum_accumulates_and_adaptive_optimizers_move_toward_the_mean():
    init = {"w": torch.zeros(3)}
    target = {"w": torch.ones(3)}
    server = Server(init, ServerConfig(), full_precision=[])
    server.install(optimizer=ServerOptimizer("fedavgm", ["w"], lr=1.0, momentum=0.5))
    _round(server, [target])  # w = 1
    assert torch.allclose(server.global_state["w"], torch.ones(3))
    _round(server, [{"w": torch.full((3,), 2.0)}])  # g = -1, m = 0.5*(-1) + (-1) = -1.5
    assert torch.allclose(server.global_state["w"], torch.full((3,), 2.5))
    for kind in ("fedadam", "fedyogi"):
        server = Server(init, ServerConfig(), full_precision=[])
        server.install(optimizer=ServerOptimizer(kind, ["w"]))
        w = _round(server, [target])["w"]
        assert bool((w > 0).all() and (w <= 1.0 + 1e-6).all()), (kind, w)
        state = server.state_dict()
        assert int(state["optimizer.steps"]) == 1 and {"optimizer.m.w", "optimizer.v.w"} <= set(state)


# ---------------------------------------------------------------- end to end on digits


@pytest.mark.parametrize(
    "extra",
    [
        dict(aggregation_mode="fedprox", lambda_fedprox=0.01),
        dict(aggregation_mode="fedbn", model_norm="batchnorm"),
        dict(aggregation_mode="abavg"),
        dict(aggregation_mode="abavg", abavg_use_test_set=True),
        dict(server_optimizer="fedavgm"),
        dict(server_optimizer="fedadam", use_quantization=True, moving_average=True),
        dict(aggregation_mode="fedgen"),
        dict(aggregation_mode="fedtgp", fedftg_iterations=2, fedftg_batch_size=16),
    ],
    ids=["fedprox", "fedbn", "abavg", "abavg-test", "fedavgm", "fedadam-8bit-ma", "fedgen", "fedftg"],
)
def test_algorithms_run_end_to_end_on_digits(extra):
    config = RunConfig(c_rounds=2, alpha=1.0, lr=3e-3, **FAST, **extra)
    sim = Simulation(config)
    if config.aggregation_mode == "abavg" and not config.abavg_use_test_set:
        seen = set().union(*(set(p.tolist()) for p in sim.parts))
        assert len(sim.val_y) > 0 and len(seen) == len(sim.data.train_y) - len(sim.val_y)
    for _ in range(2):
        metrics = sim.run_round()
        assert metrics.accepted == 2 and 0.0 <= metrics.test_accuracy <= 1.0
        json.dumps(metrics.__dict__)
    if config.aggregation_mode == "fedbn":
        assert metrics.vote_accuracy is not None and 0.0 <= metrics.vote_accuracy <= 1.0
        assert sim.server.local_names and set(sim.algorithm.client.bank.states) >= set(metrics.clients)
    if config.aggregation_mode == "fedgen":
        assert metrics.bytes_down_per_client > len(sim.server.downlink())  # the generator travels too
        assert sim.algorithm.server.fedgen.last_loss is not None
    if config.aggregation_mode == "fedftg":
        assert set(sim.algorithm.server.fedftg.last_losses) == {"generator", "distill"}
    if config.aggregation_mode in ("fedbn", "fedgen", "fedftg") or config.server_optimizer != "none":
        fresh = Simulation(config)  # a new object: loading into the one that saved it proves nothing
        stateful = [sim.server] + ([sim.algorithm] if config.aggregation_mode in ("fedbn", "fedgen", "fedftg") else [])
        for part, target in zip(stateful, (fresh.server, fresh.algorithm)):
            saved, untrained = part.state_dict(), target.state_dict()  # what a checkpoint keeps
            assert saved and any(k not in untrained or not torch.equal(untrained[k], v) for k, v in saved.items())
            target.load_state_dict(saved)
            loaded = target.state_dict()
            assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
        optimized = any(k.startswith("optimizer.") for k in fresh.server.state_dict())
        assert optimized == (config.server_optimizer != "none")
    if config.aggregation_mode == "abavg":
        assert len(sim.server.stats.weights) == 2 and all(0 < w <= 1 for w in sim.server.stats.weights)


def test_bad_algorithm_settings_are_rejected():
    for bad in (dict(aggregation_mode="fedsomething"), dict(fedgen_decay=0.0), dict(fedftg_lr=0.0),
                dict(fedgen_batch_size=1), dict(fedftg_iterations=-1), dict(server_optimizer="sgd"), dict(lambda_fedprox=-1.0),
                dict(abavg_val_fraction=1.0), dict(model_norm="weird")):
        with pytest.raises(ValueError):
            RunConfig(**bad).validate()
    assert RunConfig().fingerprint() == RunConfig(lambda_fedprox=0.01, server_optimizer="none").fingerprint()
    assert RunConfig().fingerprint() != RunConfig(aggregation_mode="fedprox").fingerprint()
    assert RunConfig().fingerprint() == RunConfig(fedgen_alpha=0.1, fedftg_iterations=10).fingerprint()
    assert RunConfig(aggregation_mode="fedtgp").aggregation_mode == "fedftg"
