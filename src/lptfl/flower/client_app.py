"""The Flower ``ClientApp``: one LPT-FL client update per ``train`` message.

A SuperNode is one client of the simulator: its node config names its partition
(``partition-id``, ``num-partitions``) of the training set, split by the simulator's own
``partition_data`` with ``num_clients = num-partitions``. Training is ``LocalTrainer`` under
``RunConfig.policy()``, seeded with ``derive_seed(seed, round, partition_id)`` like the
simulator. Every message runs in a fresh process, so the client's optimizer state (the
paper's persistent Adam moments) is kept in the node's ``Context.state`` between rounds, and
so is FedBN's batch norm. FedProx and FedGen add their local terms (FedGen's generator comes
with the train message); FedGen and FedFTG clients report their label counts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lptfl import codec
from lptfl.allocator import keep_freed_memory
from lptfl.data import load_dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import build_run_model, derive_seed, split_clients
from lptfl.fl import LocalTrainer, full_precision_names
from lptfl.fl.algorithms import batchnorm_names, proximal_regularizer
from lptfl.fl.ensemble import label_counts
from lptfl.fl.fedgen import FeatureGenerator, FedGenObjective
from lptfl.flower.config import from_flower_config
from lptfl.flower.optimizer_state import OPTIMIZER_STATE, load_optimizer_state, save_optimizer_state
from lptfl.flower.payload import PAYLOAD_RECORD, from_record, to_record
from lptfl.flower.strategy import CONFIG_RECORD, GENERATOR_RECORD, METRICS_RECORD

log = logging.getLogger(__name__)

app = ClientApp()

LOCAL_STATE = "lptfl-local-state"  # FedBN: the batch norm that never leaves the node


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    try:
        pid, count = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError("the SuperNode needs --node-config \"partition-id=I num-partitions=N\"") from err
    if not 0 <= pid < count:
        raise ValueError(f"partition-id {pid} is outside [0, {count})")
    return pid, count


def _client_data(config: RunConfig, partition_id: int, num_partitions: int):
    """(dataset, x, y) of the partition; cached for engines that reuse the process."""
    key = (config.dataset, config.data_path, config.download, config.partition, config.alpha, config.seed,
           config.aggregation_mode, config.abavg_use_test_set, config.abavg_val_fraction)
    return _cached_client_data(key, partition_id, num_partitions)


@functools.lru_cache(maxsize=2)
def _cached_client_data(key: tuple, partition_id: int, num_partitions: int):
    dataset, data_path, download, partition, alpha, seed, mode, use_test, val_fraction = key
    config = RunConfig(dataset=dataset, data_path=data_path, download=download, partition=partition, alpha=alpha,
                       seed=seed, aggregation_mode=mode, abavg_use_test_set=use_test, abavg_val_fraction=val_fraction)
    data = load_dataset(dataset, data_path, download=download)
    parts, _ = split_clients(replace(config, num_clients=num_partitions), data.train_y.numpy())
    index = torch.from_numpy(parts[partition_id])
    return data, data.train_x[index], data.train_y[index]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the downlink, train on this node's partition, reply with the encoded update."""
    keep_freed_memory()
    config, _ = from_flower_config(dict(context.run_config))
    partition_id, num_partitions = node_partition(context)
    round_index = int(msg.content.config_records[CONFIG_RECORD]["round"])
    lr = float(msg.content.config_records[CONFIG_RECORD]["lr"])
    data, x, y = _client_data(config, partition_id, num_partitions)

    policy = config.policy()
    model = build_run_model(config, data)
    initial = model.state_dict()
    local_names = set(batchnorm_names(model)) if config.aggregation_mode == "fedbn" else set()
    expect = {k: (tuple(v.shape), v.dtype) for k, v in initial.items() if k not in local_names}
    full_precision = [k for k in full_precision_names(model) if k not in local_names]
    start = codec.decode(from_record(msg.content.array_records[PAYLOAD_RECORD]), expect=expect)
    if local_names:  # FedBN: this node's own batch norm (the initial one before its first round)
        start.update(load_local_state(context.state, {k: initial[k] for k in local_names}))
    trainer = LocalTrainer(
        model, policy, optimizer=config.optimizer, lr=lr, example_input=data.train_x[: config.batch_size],
        compile=config.compile == "on", compile_mode=config.compile_mode, device=config.device,
    )
    restored = config.client_state != "none" and load_optimizer_state(trainer.inner, context.state)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, partition_id))
    regularizer = None
    if config.aggregation_mode == "fedprox":
        regularizer = proximal_regularizer(trainer.model, start, config.lambda_fedprox)
    objective = fedgen_objective(config, msg, data.num_classes, trainer.model) if config.aggregation_mode == "fedgen" else None
    result = trainer.train(start, x, y, epochs=config.epochs, batch_size=config.batch_size, generator=generator,
                           regularizer=regularizer, objective=objective)
    if config.client_state != "none":
        save_optimizer_state(trainer.inner, context.state)
    if local_names:
        context.state[LOCAL_STATE] = ArrayRecord({k: Array(result.state[k].cpu().numpy().copy()) for k in local_names})
    shared = {k: v for k, v in result.state.items() if k not in local_names}
    up = codec.encode(shared, policy.uplink, full_precision=full_precision, compress=config.compress)
    values = {
        "num-samples": int(result.num_samples),
        "train-loss": float(result.loss),
        "partition-id": partition_id,
        "state-restored": int(restored),
    }
    if config.aggregation_mode in ("fedgen", "fedftg"):
        values["label-counts"] = [int(c) for c in label_counts(y, data.num_classes)]
    return Message(RecordDict({PAYLOAD_RECORD: to_record(up), METRICS_RECORD: MetricRecord(values)}), reply_to=msg)


def load_local_state(state: RecordDict, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FedBN: the entries this node keeps (saved after its last round), else ``initial``."""
    record = state.array_records.get(LOCAL_STATE) if LOCAL_STATE in state else None
    if record is None or set(record.keys()) != set(initial):
        return {k: v.clone() for k, v in initial.items()}
    return {k: torch.from_numpy(record[k].numpy().copy()).to(initial[k].dtype) for k in initial}


def fedgen_objective(config: RunConfig, msg: Message, num_classes: int, model: torch.nn.Module) -> FedGenObjective:
    """FedGen's local objective from the generator and round settings the server sent."""
    settings = config.fedgen_config()
    generator = FeatureGenerator(num_classes, model.classifier.in_features, noise_dim=settings.noise_dim,
                                 hidden=settings.hidden)
    generator.load_state_dict(codec.decode(from_record(msg.content.array_records[GENERATOR_RECORD])))
    objective = FedGenObjective(generator.to(config.device), settings.batch_size)
    round_config = msg.content.config_records[CONFIG_RECORD]
    objective.set_round(float(round_config["fedgen-alpha"]), float(round_config["fedgen-beta"]),
                        torch.tensor(list(round_config["fedgen-labels"]), dtype=torch.int64))
    return objective


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition (the server samples partitions like the simulator samples clients)."""
    partition_id, num_partitions = node_partition(context)
    metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


__all__ = ["OPTIMIZER_STATE", "app", "load_optimizer_state", "node_partition", "save_optimizer_state", "train", "query"]
