"""``LowPrecisionFedAvg`` and the client helpers with a user's own model (a small MLP on
scikit-learn's digits), driven by Flower's own ``Strategy.start`` over an in-process Grid that
calls the helpers as a ClientApp would: no processes, no federation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _loopback_grid import LoopbackGrid

from lptfl import codec
from lptfl.fl.server_optim import ServerOptimizer
from lptfl.flower import LowPrecisionFedAvg, evaluate_low_precision, train_low_precision
from lptfl.flower.optimizer_state import OPTIMIZER_STATE
from lptfl.flower.payload import from_record, to_record
from lptfl.quant import PrecisionPolicy

# one exponent per output row: under "BC" a Linear weight (out, in) has one block per element
POLICY = PrecisionPolicy.low_precision(8, layout="B")


@pytest.fixture(autouse=True)
def task_identity():
    """Messages created outside a Flower process need a task identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


class HelperGrid(LoopbackGrid):
    """Nodes whose ClientApp is made of the lptfl helpers.

    Node ``100 + i`` trains on shard ``i`` of ``train``; ``tamper`` maps a node id to
    ``(message) -> reply`` that replaces its ClientApp (a faulty client)."""

    def __init__(self, train, test, nodes: int, *, policy=POLICY, tamper=None, epochs: int = 1) -> None:
        x, y = train
        self.shards = {100 + i: (x[i::nodes], y[i::nodes]) for i in range(nodes)}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.shards}
        self.test, self.policy, self.tamper, self.epochs = test, policy, tamper or {}, epochs
        super().__init__(self.shards, self.client_app)

    def client_app(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node in self.tamper:
            return self.tamper[node](msg)
        if msg.metadata.message_type == "train":
            return train_low_precision(msg, self.contexts[node], mlp(), self.shards[node], policy=self.policy,
                                       epochs=self.epochs, batch_size=32, lr=3e-3)
        return evaluate_low_precision(msg, mlp(), self.test, policy=self.policy)


def central_accuracy(test):
    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = mlp()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        return MetricRecord({"accuracy": accuracy})

    return evaluate_fn


def test_is_a_flower_strategy():
    assert issubclass(LowPrecisionFedAvg, Strategy) and issubclass(LowPrecisionFedAvg, FedAvg)
    with pytest.raises(ValueError, match="weighting"):
        LowPrecisionFedAvg(policy=POLICY, weighting="by-size")


def test_three_rounds_in_8_bits_with_the_moving_average(digits):
    """Flower's start() drives the rounds: 8-bit payloads (about a quarter of fp32) both ways,
    the moving average served, central and federated accuracy rising, the optimizer state
    kept in each node's Context.state from round 2 on."""
    train, test = digits
    grid = HelperGrid(train, test, nodes=2, epochs=2)
    strategy = LowPrecisionFedAvg(policy=POLICY, moving_average=True, moving_weight=0.5)
    initial = ArrayRecord(mlp().state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=3, evaluate_fn=central_accuracy(test))

    fp32_bytes = sum(p.numel() * 4 for p in mlp().state_dict().values())
    for rnd in (1, 2, 3):
        m = result.train_metrics_clientapp[rnd]
        assert m["accepted"] == 2 and m["rejected"] == 0 and m["failed"] == 0 and m["skipped"] == 0
        assert 0.24 < m["bytes-down-per-client"] / fp32_bytes < 0.30
        assert 0.24 < m["bytes-up"] / 2 / fp32_bytes < 0.30
        assert m["bytes-down"] == 2 * m["bytes-down-per-client"]
        assert m["state-restored"] == (0 if rnd == 1 else 1)
        assert math.isfinite(m["train-loss"])
    central = [result.evaluate_metrics_serverapp[r]["accuracy"] for r in range(4)]
    assert central[3] > central[1] > central[0] + 0.2, central
    federated = [result.evaluate_metrics_clientapp[r]["eval-acc"] for r in (1, 2, 3)]
    assert federated[2] > federated[0], federated
    assert all(OPTIMIZER_STATE in c.state for c in grid.contexts.values())
    # the result is the served model, the moving average: wbar_3 = 0.5 wbar_2 + 0.5 w_3
    server = strategy.server
    assert server.average_state is not None and server.round == 3
    final = result.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], server.average_state[k]) for k in final)
    # every uplink that crossed the "wire" was 8-bit block floating point
    for reply in grid.replies:
        if reply.content.array_records:
            payload = from_record(next(iter(reply.content.array_records.values())))
            codec.decode(payload, formats={"1.weight": POLICY.uplink, "3.weight": POLICY.uplink})


def garbage(msg: Message) -> Message:
    return Message(RecordDict({"arrays": to_record(b"\x00garbage" * 40),
                               "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


def fp32_update(msg: Message) -> Message:
    """A well-formed update in the wrong number format (fp32 to an 8-bit run)."""
    payload = codec.encode(mlp().state_dict(), None)
    return Message(RecordDict({"arrays": to_record(payload), "metrics": MetricRecord({"num-examples": 10})}),
                   reply_to=msg)


def bad_weight(msg: Message) -> Message:
    payload = codec.encode(mlp().state_dict(), POLICY.uplink)
    return Message(RecordDict({"arrays": to_record(payload), "metrics": MetricRecord({"num-examples": float("nan")})}),
                   reply_to=msg)


def error_reply(msg: Message) -> Message:
    return Message(Error(code=2, reason="ClientApp exception"), reply_to=msg)


def test_bad_replies_are_rejected_and_a_short_round_keeps_the_model(digits):
    """Garbage, an fp32 update to an 8-bit run, a NaN weight and an error reply: each counted
    and skipped; with min_accepted=2 and one good update the round is skipped, model unchanged."""
    train, test = digits
    tamper = {101: garbage, 102: fp32_update, 103: bad_weight, 104: error_reply}
    grid = HelperGrid(train, test, nodes=5, tamper=tamper)
    strategy = LowPrecisionFedAvg(policy=POLICY, min_accepted=2, fraction_evaluate=0.0, moving_average=False)
    initial = ArrayRecord(mlp().state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    m = result.train_metrics_clientapp[1]
    assert (m["accepted"], m["rejected"], m["failed"], m["skipped"]) == (1, 3, 1, 1)
    assert strategy.server.round == 1
    served = strategy.server.served_state()
    start = mlp().state_dict()
    assert all(torch.equal(served[k], start[k]) for k in start)
    assert len(result.arrays) == 0  # no aggregate: Flower keeps the initial arrays in its loop


def good_update(**metrics):
    def reply(msg: Message) -> Message:
        payload = codec.encode(mlp().state_dict(), POLICY.uplink)
        return Message(RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return reply


def test_every_reply_field_is_checked_and_the_round_goes_on(digits):
    """A weight above max_weight, a non-finite metric, a reply to another node's message and a
    raising check_reply hook are each rejected with a reason; the good update is aggregated."""
    train, test = digits

    class Strict(LowPrecisionFedAvg):
        def check_reply(self, server_round, node_id, metrics):
            if "boom" in metrics:
                raise KeyError("a check that fails on odd input")
            return node_id

    def other_node(msg: Message) -> Message:
        reply = good_update(**{"num-examples": 10})(msg)
        reply.metadata.__dict__["_src_node_id"] = 999
        return reply

    tamper = {101: good_update(**{"num-examples": 10**9}), 102: good_update(**{"num-examples": 10, "loss": math.inf}),
              103: other_node, 104: good_update(**{"num-examples": 10, "boom": 1})}
    grid = HelperGrid(train, test, nodes=5, tamper=tamper)
    strategy = Strict(policy=POLICY, fraction_evaluate=0.0, max_weight=10_000)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(mlp().state_dict()), num_rounds=1)
    m = result.train_metrics_clientapp[1]
    assert (m["accepted"], m["rejected"], m["failed"], m["skipped"]) == (1, 4, 0, 0)
    reasons = {o.node: o.reason for o in strategy.last_round.outcomes}
    assert "above the limit of 10000" in reasons[101]
    assert "metric 'loss' must be finite, got inf" in reasons[102]
    assert "the reply came from node 999" in reasons[103]
    assert "a check that fails on odd input" in reasons[104]
    assert {o.node: o.status for o in strategy.last_round.outcomes} == {100: "accepted", **dict.fromkeys(tamper, "rejected")}
    with pytest.raises(ValueError, match=r"max_weight must be a finite number > 0, got 0.0"):
        LowPrecisionFedAvg(policy=POLICY, max_weight=0)


def test_client_refuses_a_policy_the_server_does_not_accept(digits):
    train, test = digits
    grid = HelperGrid(train, test, nodes=2, policy=PrecisionPolicy.low_precision(6))
    strategy = LowPrecisionFedAvg(policy=POLICY, fraction_evaluate=0.0)
    with pytest.raises(ValueError, match="accepts uplinks in bfp8e8-B-FC, this client's policy sends bfp6e8-BC-FC"):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(mlp().state_dict()), num_rounds=1)


def train_message(strategy: LowPrecisionFedAvg, grid: HelperGrid, model: nn.Module) -> Message:
    (msg, *_) = strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), grid)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def update_of(reply: Message) -> dict[str, torch.Tensor]:
    return codec.decode(from_record(reply.content.array_records["arrays"]))


def test_a_dataloader_trains_exactly_as_its_tensors(digits):
    train, test = digits
    grid = HelperGrid(train, test, nodes=1)
    strategy = LowPrecisionFedAvg(policy=POLICY, min_train_nodes=1, min_available_nodes=1)
    msg = train_message(strategy, grid, mlp())
    x, y = train[0][:200], train[1][:200]
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=32)  # float64, as numpy gives

    def context():
        return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    a = train_low_precision(msg, context(), mlp(), (x, y), policy=POLICY, batch_size=32)
    b = train_low_precision(msg, context(), mlp(), loader, policy=POLICY)
    ua, ub = update_of(a), update_of(b)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    assert a.content.metric_records["metrics"]["num-examples"] == 200
    with pytest.raises(TypeError, match="pair of tensors"):
        train_low_precision(msg, context(), mlp(), [x], policy=POLICY)


def test_a_client_whose_training_diverges_says_so_and_keeps_its_state(digits):
    """A NaN/inf update cannot travel: the client raises (Flower counts it as failed), naming the round
    and the entry, and its optimizer state of before the round stays for its next round."""
    train, test = digits
    grid = HelperGrid(train, test, nodes=1)
    strategy = LowPrecisionFedAvg(policy=POLICY, min_train_nodes=1, min_available_nodes=1)
    msg = train_message(strategy, grid, mlp())
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    x, y = train[0][:64], train[1][:64]
    train_low_precision(msg, context, mlp(), (x, y), policy=POLICY, batch_size=32)
    kept = {key: dict(record) for key, record in context.state.items()}
    with pytest.raises(ValueError, match=r"training diverged in round 1: '.*' holds NaN or infinite values"):
        train_low_precision(msg, context, mlp(), (x, y), policy=POLICY, batch_size=32, lr=1e30)
    assert {key: dict(record) for key, record in context.state.items()} == kept


@pytest.mark.parametrize("kwargs, error, message", [
    ({"policy": "paper-8bit"}, TypeError, r"policy must be a PrecisionPolicy \(e.g. .*\), got str"),
    ({"server_optimizer": "fedadam"}, TypeError, r"server_optimizer must be a ServerOptimizer or None .*got str"),
    ({"moving_weight": "0.9"}, TypeError, r"moving_weight must be a finite number in \[0, 1\), got str '0.9'"),
    ({"moving_weight": 1.0}, ValueError, r"moving_weight must be a finite number in \[0, 1\), got 1.0"),
    ({"moving_average": "false"}, TypeError, "moving_average must be True or False, got str 'false'"),
    ({"ma_start": 1.5}, TypeError, "ma_start must be an integer >= 1, got float 1.5"),
    ({"min_accepted": 0}, ValueError, "min_accepted must be an integer >= 1, got 0"),
    ({"max_payload_bytes": 0}, ValueError, "max_payload_bytes must be an integer >= 1, got 0"),
    ({"fraction_train": 1.5}, ValueError, r"fraction_train must be a finite number in \[0, 1\], got 1.5"),
    ({"proximal_mu": "0.1"}, TypeError, "proximal_mu must be a finite number >= 0, got str '0.1'"),
    ({"max_update_norm": float("nan")}, ValueError, "max_update_norm must be a finite number > 0, got nan"),
    ({"seed": "x"}, TypeError, "seed must be an integer, got str 'x'"),
    ({"full_precision": "0.bias"}, TypeError, r"full_precision must be a list of state-entry names, got the "
                                              r"single string '0.bias' \(write \['0.bias'\]\)"),
])
def test_strategy_arguments_are_checked_when_it_is_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        LowPrecisionFedAvg(**{"policy": POLICY, **kwargs})


def test_strategy_takes_numpy_scalars_as_numbers():
    strategy = LowPrecisionFedAvg(policy=POLICY, moving_weight=np.float32(0.5), ma_start=np.int64(2),
                                  proximal_mu=np.float64(0.1), max_payload_bytes=np.int32(1 << 20))
    config = strategy.server_config
    assert (config.moving_weight, config.ma_start, config.max_payload_bytes) == (0.5, 2, 1 << 20)
    assert type(config.ma_start) is int and type(config.moving_weight) is float and strategy.proximal_mu == 0.1


def test_summary_goes_to_flowers_log_beside_fedavgs():
    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    flower = logging.getLogger("flwr")
    flower.addHandler(lines)
    try:
        LowPrecisionFedAvg(policy=POLICY, moving_weight=0.5).summary()
    finally:
        flower.removeHandler(lines)
    assert any("Fraction: train" in line for line in lines.lines)  # FedAvg's own summary
    assert lines.lines[-1] == ("\tlptfl: downlink bfp8e8-B-FC, uplink bfp8e8-B-FC, weighting samples, "
                               "moving average lambda=0.5 from round 1, min accepted 1")


def test_client_helpers_check_their_arguments_and_data(digits):
    """A user's mistake stops before any training with one line naming it, instead of a torch error
    deep inside the step, a silent truncation, or a round of made-up metrics."""
    train, test = digits
    grid = HelperGrid(train, test, nodes=1)
    strategy = LowPrecisionFedAvg(policy=POLICY, min_train_nodes=1, min_available_nodes=1)
    msg = train_message(strategy, grid, mlp())
    x, y = train[0][:64], train[1][:64]
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    cases = [
        ({"train_data": ((x * 16).to(torch.uint8), y)}, TypeError, r"x must be a floating-point tensor .*torch.uint8"),
        ({"train_data": (x, y.float() + 0.7)}, TypeError, "y must hold integer class indices of shape \\(n,\\), "
                                                          "got torch.float32"),
        ({"train_data": (x, nn.functional.one_hot(y, 10))}, TypeError, r"y must hold integer class indices .*"
                                                                      r"\(64, 10\)"),
        ({"train_data": (torch.full_like(x, math.nan), y)}, ValueError, "x holds NaN or infinite values"),
        ({"train_data": (torch.tensor(1.0), torch.tensor(1))}, TypeError, "x must be a floating-point tensor"),
        ({"policy": "paper-8bit"}, TypeError, "policy must be a PrecisionPolicy"),
        ({"epochs": 0}, ValueError, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 1.5}, TypeError, "epochs must be an integer >= 1, got float 1.5"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
        ({"lr": "0.01"}, TypeError, "lr must be a finite number > 0, got str '0.01'"),
        ({"keep_local": "0.weight"}, TypeError, "keep_local must be a list of state-entry names, got the single string"),
        ({"metrics": {"num-examples": 10**9}}, ValueError, r"metrics may not redefine \['num-examples'\]"),
    ]
    plain = Message(RecordDict({"arrays": ArrayRecord(mlp().state_dict()), "config": ConfigRecord({"lr": 0.01})}),
                    dst_node_id=7, message_type="train")  # what Flower's FedAvg sends
    with pytest.raises(codec.PayloadError, match=r"single key 'bytes', got the keys \['1.weight', '1.bias', "
                                                 r"'3.weight'\] ...; the message lacks lptfl's train config, so "
                                                 r"the ServerApp's strategy is not lptfl.flower.LowPrecisionFedAvg"):
        train_low_precision(plain, context, mlp(), (x, y), policy=POLICY)
    smaller = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(codec.PayloadError, match=r"the server's model does not decode to this client's model "
                                                 r"\('expected' is this client's, 'got' the server's\): tensor "
                                                 r"'1.weight': expected shape \(32, 64\), got \(128, 64\)"):
        train_low_precision(msg, context, smaller, (x, y), policy=POLICY)
    for change, error, message in cases:
        kwargs = {"train_data": (x, y), "policy": POLICY, **change}
        with pytest.raises(error, match=message):
            train_low_precision(msg, context, mlp(), kwargs.pop("train_data"), **kwargs)
    assert len(context.state) == 0  # nothing trained, nothing stored
    for change, error, message in [({"batch_size": -5}, ValueError, "batch_size must be an integer >= 1, got -5"),
                                   ({"policy": None}, TypeError, "policy must be a PrecisionPolicy"),
                                   ({"test_data": (x.long(), y)}, TypeError, "x must be a floating-point tensor")]:
        kwargs = {"test_data": (x, y), "policy": POLICY, **change}
        with pytest.raises(error, match=message):
            evaluate_low_precision(msg, mlp(), kwargs.pop("test_data"), **kwargs)


def test_proximal_mu_pulls_the_update_towards_the_global_model(digits):
    train, test = digits
    grid = HelperGrid(train, test, nodes=1)
    start = mlp().state_dict()
    distances = []
    for mu in (0.0, 50.0):
        strategy = LowPrecisionFedAvg(policy=POLICY, min_train_nodes=1, min_available_nodes=1, proximal_mu=mu)
        msg = train_message(strategy, grid, mlp())
        assert ("proximal-mu" in msg.content["config"]) == (mu > 0)
        context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
        update = update_of(train_low_precision(msg, context, mlp(), train, policy=POLICY, lr=1e-2, seed=3))
        distances.append(sum(float((update[k] - start[k]).pow(2).sum()) for k in start) ** 0.5)
    assert distances[1] < 0.7 * distances[0], distances


def test_server_optimizer_composes(digits):
    """FedAdam on the float64 aggregate: a different model than plain averaging, still learning."""
    train, test = digits
    finals = []
    for optimizer in (None, ServerOptimizer("fedadam", names=[n for n, _ in mlp().named_parameters()], lr=0.01)):
        strategy = LowPrecisionFedAvg(policy=POLICY, moving_average=False, fraction_evaluate=0.0,
                                      server_optimizer=optimizer)
        result = strategy.start(grid=HelperGrid(train, test, nodes=2), initial_arrays=ArrayRecord(mlp().state_dict()),
                                num_rounds=2, evaluate_fn=central_accuracy(test))
        finals.append(result)
    plain, adam = (r.arrays.to_torch_state_dict() for r in finals)
    assert any(not torch.equal(plain[k], adam[k]) for k in plain)
    assert finals[1].evaluate_metrics_serverapp[2]["accuracy"] > finals[1].evaluate_metrics_serverapp[0]["accuracy"]


def test_optimizer_state_that_does_not_fit_starts_fresh(digits):
    train, test = digits
    grid = HelperGrid(train, test, nodes=1)
    strategy = LowPrecisionFedAvg(policy=POLICY, min_train_nodes=1, min_available_nodes=1)
    msg = train_message(strategy, grid, mlp())
    state = RecordDict({OPTIMIZER_STATE: ArrayRecord({"exp_avg": Array(np.zeros(9, np.float32))})})
    context = Context(run_id=1, node_id=7, node_config={}, state=state, run_config={})
    reply = train_low_precision(msg, context, mlp(), train, policy=POLICY)
    assert reply.content.metric_records["metrics"]["state-restored"] == 0
    size = sum(p.numel() for p in mlp().parameters())
    assert context.state.array_records[OPTIMIZER_STATE]["exp_avg"].shape == (size,)
