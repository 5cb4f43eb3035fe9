"""The Flower ``ClientApp``: one LPT-FL client update per ``train`` message.

A SuperNode is one client of the simulator: its node config names its partition
(``partition-id``, ``num-partitions``) of the training set, split by the simulator's own
``partition_data`` with ``num_clients = num-partitions``. The update is
:func:`lptfl.flower.train_low_precision` on this node's partition under
``RunConfig.policy()``, seeded with ``derive_seed(seed, round, partition_id)`` like the
simulator, with the round's learning rate from the train config. The helper keeps the
client's optimizer state (the paper's persistent Adam moments) in the node's ``Context.state``,
and FedBN's batch norm too; FedProx's term comes with the config (``proximal-mu``), FedGen's
objective from the generator sent with the model; FedGen and FedFTG clients report their
label counts. A train message for another partition than this node's is refused.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lptfl import codec
from lptfl.allocator import keep_freed_memory
from lptfl.data import load_dataset
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import build_run_model, derive_seed, split_clients
from lptfl.fl.algorithms import batchnorm_names
from lptfl.fl.ensemble import label_counts
from lptfl.fl.fedgen import FeatureGenerator, FedGenObjective
from lptfl.flower.config import from_flower_config
from lptfl.flower.partitions import METRICS_RECORD
from lptfl.flower.payload import GENERATOR_RECORD, from_record
from lptfl.flower.training import train_low_precision

log = logging.getLogger(__name__)

app = ClientApp()

CONFIG_RECORD = "config"


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
    """Train on this node's partition from the downlink; reply with the encoded update."""
    keep_freed_memory()
    config, _ = from_flower_config(dict(context.run_config))
    partition_id, num_partitions = node_partition(context)
    settings = msg.content.config_records[CONFIG_RECORD]
    if settings.get("partition-id") != partition_id:
        raise ValueError(f"the server assigned partition {settings.get('partition-id')!r} to this node, "
                         f"which holds partition {partition_id}")
    round_index = int(settings["server-round"])
    data, x, y = _client_data(config, partition_id, num_partitions)
    model = build_run_model(config, data)
    extra = {"partition-id": partition_id}
    if config.aggregation_mode in ("fedgen", "fedftg"):
        extra["label-counts"] = [int(c) for c in label_counts(y, data.num_classes)]
    objective = fedgen_objective(config, msg, data.num_classes, model) if config.aggregation_mode == "fedgen" else None
    return train_low_precision(
        msg, context, model, (x, y), policy=config.policy(), epochs=config.epochs, batch_size=config.batch_size,
        lr=float(settings["lr"]), optimizer=config.optimizer, keep_optimizer_state=config.client_state != "none",
        compress=config.compress, seed=derive_seed(config.seed, round_index, partition_id), device=config.device,
        compile=config.compile == "on", compile_mode=config.compile_mode,
        keep_local=batchnorm_names(model) if config.aggregation_mode == "fedbn" else (),
        objective=objective, metrics=extra,
    )


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


__all__ = ["app", "node_partition", "query", "train"]
