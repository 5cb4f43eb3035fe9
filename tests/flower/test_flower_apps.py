"""The Flower apps without a federation: config mapping, payload records, the ServerApp's
strategy over an in-process Grid that runs the real ClientApp handlers, and bad replies."""

from __future__ import annotations

import json
from dataclasses import replace
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from lptfl.codec import PayloadError
from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import read_metrics
from lptfl.flower import client_app
from lptfl.flower.local_state import LOCAL_STATE
from lptfl.flower.optimizer_state import OPTIMIZER_STATE
from lptfl.flower.config import (
    FlowerOptions,
    default_app_config,
    from_flower_config,
    to_flower_config,
)
from lptfl.flower.payload import from_record, to_record
from lptfl.flower.partitions import PartitionMap
from lptfl.flower.server_app import FlowerRun

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity():
    """Messages created outside a Flower process need a task identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def small_config(**overrides) -> RunConfig:
    values = dict(dataset="digits", model_width=8, c_rounds=2, num_clients=2, frac=1.0, batch_size=128)
    values.update(overrides)
    return RunConfig(**values)


# -- config -------------------------------------------------------------------------------------
def test_flower_config_round_trip_and_spellings():
    config = small_config(use_quantization=True, quantization_bits=6, moving_average=True)
    options = FlowerOptions(out_dir="/tmp/x", min_nodes=3)
    back, back_options = from_flower_config(to_flower_config(config, options))
    assert back == config and back_options == options
    # underscores accepted; an integer where a number belongs is the only conversion
    back, _ = from_flower_config({"c_rounds": 4, "use-quantization": True, "lr": 1})
    assert back.c_rounds == 4 and back.use_quantization is True and back.lr == 1.0 and type(back.lr) is float
    for bad, message in [
        ({"use-quantization": "true"}, 'run config: use-quantization: expected true or false, got "true"'),
        ({"c-rounds": 4.0}, "run config: c-rounds: expected an integer, got 4.0"),
        ({"round-timeout": "60"}, 'run config: round-timeout: expected a finite number, got "60"'),
        ({"frac": 2.0}, r"run config: frac: expected a number in \(0, 1\], got 2.0"),
        ({"c-round": 3}, r"run config: c-round: unknown setting; did you mean c-rounds\?"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_flower_config(bad)


def test_pyproject_app_config_lists_every_key():
    """Flower rejects override keys missing from [tool.flwr.app.config]."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "lptfl.flower.server_app:app", "clientapp": "lptfl.flower.client_app:app",
    }
    assert set(app["config"]) == set(default_app_config()), "sync [tool.flwr.app.config] with RunConfig"
    from_flower_config(app["config"])  # valid defaults
    assert "flwr[simulation]>=1.42,<1.43" in project["project"]["optional-dependencies"]["flower"]


# -- payload records ----------------------------------------------------------------------------
def test_payload_record_is_bit_exact_and_strict():
    payload = bytes(range(256)) * 3
    assert from_record(to_record(payload)) == payload
    with pytest.raises(PayloadError):
        from_record(ArrayRecord({"bytes": Array(np.zeros(4, np.float32))}))
    with pytest.raises(PayloadError):
        from_record(ArrayRecord({"bytes": Array(np.zeros((2, 2), np.uint8))}))
    with pytest.raises(PayloadError):
        from_record(ArrayRecord({"other": Array(np.zeros(4, np.uint8))}))
    with pytest.raises(PayloadError, match="exceeds"):
        from_record(to_record(b"x" * 100), max_bytes=10)


# -- an in-process Grid: the real ClientApp handlers, no processes --------------------------------
class InProcessGrid(Grid):
    """Delivers each message to the ClientApp handler of a simulated node, in this process.

    ``tamper`` maps a node id to a function ``(message, context) -> reply`` that replaces its
    ClientApp's train handler (a faulty client).
    """

    def __init__(self, config: RunConfig, nodes: int, tamper=None) -> None:
        self.run_config = to_flower_config(config)
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": nodes},
                             state=RecordDict(), run_config=self.run_config)
            for i in range(nodes)
        }
        self.tamper = tamper or {}
        self.pending: dict[str, Message] = {}
        self.sent: list[Message] = []

    def set_run(self, run_id):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                handler = self.tamper.get(node, client_app.train)
            else:
                handler = client_app.query
            reply = handler(msg, self.contexts[node])
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def garbage_payload(msg: Message, context: Context) -> Message:
    """The real reply with garbage bytes for the update."""
    reply = client_app.train(msg, context)
    return Message(RecordDict({"arrays": to_record(b"\x00garbage" * 50),
                               "metrics": reply.content.metric_records["metrics"]}), reply_to=msg)


def test_rounds_in_process_match_metrics_format_and_skip_garbage(tmp_path):
    """A round through FlowerRun + the real ClientApp handler; node 101 sends garbage: it is
    logged, counted as rejected and skipped; the others' updates are aggregated."""
    config = small_config(c_rounds=1)
    grid = InProcessGrid(config, nodes=3, tamper={101: garbage_payload})
    run = FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=3))
    summary = run.run(grid)
    rounds = read_metrics(tmp_path)
    assert [r["round"] for r in rounds] == [1]
    for r in rounds:
        assert r["accepted"] == 2 and r["rejected"] == 1
        assert r["clients"] == [0, 2]
        assert any("node 101" in reason or "client 1" in reason for reason in r["rejected_reasons"])
        assert len(r["bytes_up_per_client"]) == 3 and r["bytes_down"] == 3 * r["bytes_down_per_client"] > 0
        assert not r["skipped"]
    assert summary["rejected_updates_total"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1
    # the optimizer state of each client survived between rounds in its node's Context.state
    assert all(OPTIMIZER_STATE in grid.contexts[n].state for n in (100, 102))


def test_nodes_with_conflicting_partitions_are_never_sampled(tmp_path, caplog):
    """A node claiming another node's partition, or another number of partitions than the
    others, is left out; the rest train as usual."""
    config = small_config(c_rounds=1)
    grid = InProcessGrid(config, nodes=4)
    grid.contexts[102].node_config.update({"partition-id": 0})
    grid.contexts[103].node_config.update({"partition-id": 3, "num-partitions": 9})
    FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=4)).run(grid)
    (r,) = read_metrics(tmp_path)
    assert r["nodes"] == [100, 101] and r["clients"] == [0, 1] and r["accepted"] == 2
    assert "node 102 claims partition 0 of node 100" in caplog.text
    assert "node 103 reports 9 partitions, the others 4" in caplog.text
    assert "no SuperNode holds partition(s) [2, 3]" in caplog.text


def test_too_few_good_replies_keep_the_old_model(tmp_path):
    """With --min_clients 2 and one of two nodes failing, the server skips the round."""
    config = small_config(c_rounds=1, min_clients=2)

    def error_reply(msg, context):
        from flwr.app import Error

        return Message(Error(code=2, reason="ClientApp exception"), reply_to=msg)

    grid = InProcessGrid(config, nodes=2, tamper={101: error_reply})
    run = FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=2))
    before = {k: v.clone() for k, v in run.initial.items()}
    run.run(grid)
    (r,) = read_metrics(tmp_path)
    assert r["skipped"] and r["accepted"] == 1 and r["errors"] == 1 and r["failed"] == 1
    assert r["failed_clients"] == [101]
    after = run.server.served_state()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


def sent_train_messages(run: FlowerRun, grid: InProcessGrid) -> list[Message]:
    """The strategy's round-1 train messages, with the ids a SuperLink would give them."""
    run.strategy.assign(PartitionMap(node_of={i: n for i, n in enumerate(grid.contexts)}, count=len(grid.contexts)))
    messages = list(run.strategy.configure_train(1, ArrayRecord(run.initial), ConfigRecord(), grid))
    for m in messages:
        m.metadata.__dict__["_message_id"] = m.object_id
    return messages


def reply_with(msg: Message, payload: bytes, **metrics) -> Message:
    return Message(RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(metrics)}), reply_to=msg)


def test_strategy_rejects_malformed_replies_without_touching_the_model():
    """The ServerApp's strategy directly: garbage bytes, a wrong array, missing metrics, a lying
    partition id, a wrong sample count, a reply for another node's message, no reply."""
    config = small_config()
    grid = InProcessGrid(config, nodes=7)
    run = FlowerRun(config, FlowerOptions())
    messages = sent_train_messages(run, grid)
    assert [m.content["config"]["partition-id"] for m in messages] == list(range(7))
    good = client_app.train(messages[0], grid.contexts[100])
    good_payload = from_record(good.content.array_records["arrays"])
    size = good.content.metric_records["metrics"]["num-examples"]
    sizes = {i: len(p) for i, p in enumerate(split_clients_of(config, 7))}
    replies = [
        reply_with(messages[0], b"\x01" * 64, **{"num-examples": size, "train-loss": 1.0, "partition-id": 0}),
        Message(RecordDict({"arrays": ArrayRecord({"bytes": Array(np.zeros(8, np.float64))}),
                            "metrics": MetricRecord({"num-examples": sizes[1], "train-loss": 1.0, "partition-id": 1})}),
                reply_to=messages[1]),
        Message(RecordDict({"arrays": to_record(good_payload), "config": ConfigRecord({"x": 1})}), reply_to=messages[2]),
        reply_with(messages[3], good_payload, **{"num-examples": sizes[3], "train-loss": 1.0, "partition-id": 0}),
        reply_with(messages[4], good_payload, **{"num-examples": sizes[4] + 1, "train-loss": 1.0, "partition-id": 4}),
        reply_with(messages[0], good_payload, **{"num-examples": size, "train-loss": 1.0, "partition-id": 0}),
    ]
    replies[-1].metadata.__dict__["_src_node_id"] = 105  # node 105 answering node 100's message
    _, metrics = run.strategy.aggregate_train(1, replies)
    report = run.strategy.last_round
    assert [o.status for o in report.outcomes] == ["rejected"] * 5 + ["missing", "missing", "rejected"]
    assert "partition-id 0 is not the partition 3 assigned to node 103" in report.outcomes[3].reason
    assert f"num-examples {sizes[4] + 1} is not the {sizes[4]} samples of partition 4" in report.outcomes[4].reason
    assert (metrics["accepted"], metrics["rejected"], metrics["failed"], metrics["skipped"]) == (0, 6, 2, 1)
    assert run.server.round == 1
    after = run.server.served_state()
    before = run.initial
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


def split_clients_of(config: RunConfig, parts: int):
    from dataclasses import replace

    from lptfl.data import load_dataset
    from lptfl.experiment.setup import split_clients

    data = load_dataset(config.dataset, config.data_path, download=config.download)
    return split_clients(replace(config, num_clients=parts), data.train_y.numpy())[0]


def test_client_app_compiles_where_its_own_work_pays_for_it(monkeypatch):
    """``--compile auto`` has one rule in both drivers, weighed on the work of one process: the
    simulator's process runs the whole run, a ClientApp's one client's round. A long run (~3,000
    steps, 500 rounds of 6) compiles in the simulator, not in a ClientApp; a round of 200 local
    epochs (~1,200 steps) compiles in both."""
    seen = []
    monkeypatch.setattr(client_app, "train_low_precision", lambda *args, compile, **kwargs: seen.append(compile))
    for rounds, epochs, in_client in ((2, 1, False), (500, 1, False), (2, 200, True)):
        config = small_config(c_rounds=rounds, epochs=epochs, use_quantization=True)
        grid = InProcessGrid(config, nodes=2)
        run = FlowerRun(config, FlowerOptions())
        client_app.train(sent_train_messages(run, grid)[0], grid.contexts[100])
        assert seen[-1] == in_client, (rounds, epochs)
        assert run.plan.train == (rounds == 500 or epochs == 200)


@pytest.mark.parametrize("low_precision", [False, True], ids=["fp32", "8bit-ma"])
def test_parity_with_the_simulator(tmp_path, low_precision):
    """Same config, same seeds, the default ``--compile``: the Flower driver (in-process grid)
    reproduces ``lptfl run``'s rounds: sampled clients, accuracy, losses and payload bytes. The fp32
    case samples 2 of 3 clients per round (``--frac`` < 1: the server asks the nodes for their partitions)."""
    from lptfl.sim.engine import Simulation

    extra = dict(use_quantization=True, quantization_bits=8, moving_average=True) if low_precision else {}
    nodes, frac = (2, 1.0) if low_precision else (3, 0.67)
    config = small_config(c_rounds=2, num_clients=nodes, frac=frac, **extra)
    sim = Simulation(config)
    expected = [sim.run_round() for _ in range(config.c_rounds)]
    FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=nodes)).run(InProcessGrid(config, nodes=nodes))
    got = read_metrics(tmp_path)
    for want, have in zip(expected, got, strict=True):
        assert have["clients"] == want.clients
        assert have["state_restored"] == (0 if want.round == 1 else len(set(want.clients) & set(expected[0].clients)))
        assert have["bytes_up_per_client"] == want.bytes_up_per_client
        assert have["bytes_down"] == want.bytes_down
        assert have["test_accuracy"] == pytest.approx(want.test_accuracy, abs=1e-9)
        assert have["test_loss"] == pytest.approx(want.test_loss, rel=1e-5)
        assert have["train_loss"] == pytest.approx(want.train_loss, rel=1e-5)


@pytest.mark.parametrize("low_precision", [False, True], ids=["fp32", "8bit-ma"])
def test_flower_records_both_scores_and_leaves_rounds_not_evaluated_null(tmp_path, low_precision):
    """The ServerApp scores the served model as the simulator does: both named scores, test_accuracy
    by --eval_precision (8-bit with the average: fp32 activations), null test metrics in the rounds
    --eval_every passes over (fp32: 6 rounds, every 4th and the last 5 scored, so not round 1)."""
    from lptfl.experiment.results import TEST_FIELDS
    from lptfl.sim.engine import Simulation

    extra = dict(c_rounds=1, use_quantization=True, moving_average=True) if low_precision else dict(c_rounds=6,
                                                                                                    eval_every=4)
    config = small_config(num_clients=2, frac=1.0, **extra)
    sim = Simulation(config)
    expected = [sim.run_round() for _ in range(config.c_rounds)]
    FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=2)).run(InProcessGrid(config, nodes=2))
    got = read_metrics(tmp_path)
    for want, have in zip(expected, got, strict=True):
        for name in TEST_FIELDS:
            assert (have[name] is None) == (getattr(want, name) is None) == (want.round == 1 and not low_precision)
            if have[name] is not None:
                assert have[name] == pytest.approx(getattr(want, name), rel=1e-5), name
    if low_precision:
        assert got[0]["test_accuracy"] == got[0]["test_accuracy_fp32_act"]
        assert got[0]["test_loss_fp32_act"] != got[0]["test_loss_policy_act"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy_fp32_act_mean"] is not None and summary["final_accuracy_policy_act_mean"] is not None


@pytest.mark.parametrize(
    "extra",
    [
        dict(aggregation_mode="fedprox", lambda_fedprox=0.05),
        dict(aggregation_mode="abavg"),
        dict(aggregation_mode="fedbn", model_norm="batchnorm"),
        dict(aggregation_mode="fedgen"),
        dict(aggregation_mode="fedtgp", fedftg_iterations=2, fedftg_batch_size=8),
        dict(server_optimizer="fedadam", moving_average=True),
    ],
    ids=["fedprox", "abavg", "fedbn", "fedgen", "fedftg", "fedadam-ma"],
)
def test_algorithms_on_flower_match_the_simulator(tmp_path, extra):
    """Every FL algorithm runs on the Flower driver with the simulator's results: FedProx's and
    FedGen's local terms (FedGen's generator travels in the train message), ABAvg's validation
    split, FedBN's batch norm kept in each node's Context.state, FedFTG's fine-tuning from the
    reported label counts, and a server optimizer."""
    from lptfl.sim.engine import Simulation

    config = small_config(c_rounds=2, num_clients=2, frac=1.0, **extra)
    sim = Simulation(config)
    expected = [sim.run_round() for _ in range(config.c_rounds)]
    grid = InProcessGrid(config, nodes=2)
    FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=2)).run(grid)
    got = read_metrics(tmp_path)
    for want, have in zip(expected, got, strict=True):
        assert have["accepted"] == 2
        assert have["bytes_up_per_client"] == want.bytes_up_per_client
        assert have["bytes_down"] == want.bytes_down
        assert have["test_accuracy"] == pytest.approx(want.test_accuracy, abs=1e-9)
        assert have["test_loss"] == pytest.approx(want.test_loss, rel=1e-5)
        assert have["train_loss"] == pytest.approx(want.train_loss, rel=1e-5)
    if config.aggregation_mode == "fedbn":
        assert all(LOCAL_STATE in grid.contexts[n].state for n in grid.contexts)
    if config.aggregation_mode == "fedgen":
        assert all("fedgen-generator" in m.content.array_records for m in grid.sent if m.metadata.message_type == "train")


def test_bad_label_counts_are_rejected_without_touching_the_model():
    """FedFTG needs each update's label counts: a reply with malformed counts is refused."""
    config = small_config(aggregation_mode="fedftg", fedftg_iterations=1)
    grid = InProcessGrid(config, nodes=4)
    run = FlowerRun(config, FlowerOptions())
    messages = sent_train_messages(run, grid)
    payload = run.server.downlink()  # a well-formed model payload
    sizes = [len(p) for p in split_clients_of(config, 4)]
    bad_counts = ([1, 2], [-1] * 10, [1.5] * 10, [sizes[3]] + [1] * 9)
    replies = [reply_with(m, payload, **{"num-examples": sizes[i], "train-loss": 1.0, "partition-id": i,
                                         "label-counts": counts})
               for i, (m, counts) in enumerate(zip(messages, bad_counts))]
    _, metrics = run.strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 0 and metrics["rejected"] == 4 and metrics["skipped"] == 1
    assert all("label-counts" in o.reason for o in run.strategy.last_round.outcomes)


@pytest.mark.parametrize("extra", [dict(use_quantization=True, moving_average=True),
                                   dict(aggregation_mode="fedgen")], ids=["8bit-ma", "fedgen"])
def test_restarted_server_app_resumes_from_its_checkpoint(tmp_path, extra):
    """A ServerApp restarted with the same out-dir (the nodes kept their Context.state) continues from
    its checkpoint: the run's rounds 3-4 are those of an uninterrupted run, and the files are one run's."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    config = small_config(c_rounds=4, num_clients=3, frac=0.67, **extra)
    FlowerRun(config, FlowerOptions(out_dir=str(whole), min_nodes=3)).run(InProcessGrid(config, nodes=3))
    grid = InProcessGrid(config, nodes=3)
    FlowerRun(replace(config, c_rounds=2), FlowerOptions(out_dir=str(parts), min_nodes=3)).run(grid)
    with (parts / "metrics.jsonl").open("a") as handle:  # a round written after the last checkpoint
        handle.write(json.dumps({"round": 3}) + "\n")
    run = FlowerRun(config, FlowerOptions(out_dir=str(parts), min_nodes=3))
    run.run(grid)
    assert run.strategy.rounds_done == 2
    want, got = read_metrics(whole), read_metrics(parts)
    assert [m["round"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=True):
        for key in ("clients", "bytes_up_per_client", "bytes_down", "test_accuracy", "test_loss", "train_loss", "lr"):
            assert a[key] == b[key], (a["round"], key)
    assert json.loads((parts / "summary.json").read_text())["rounds"] == 4


def test_server_app_starts_anew_over_a_run_of_other_settings(tmp_path):
    config = small_config(c_rounds=2)
    FlowerRun(config, FlowerOptions(out_dir=str(tmp_path), min_nodes=2)).run(InProcessGrid(config, nodes=2))
    other = replace(config, c_rounds=3, seed=5)
    run = FlowerRun(other, FlowerOptions(out_dir=str(tmp_path), min_nodes=2))
    run.run(InProcessGrid(other, nodes=2))
    assert run.strategy.rounds_done == 0
    assert [m["round"] for m in read_metrics(tmp_path)] == [1, 2, 3]
