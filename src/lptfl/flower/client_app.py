"""The Flower ``ClientApp``: one LPT-FL client update per ``train`` message.

A SuperNode is one client of the simulator: its node config names its partition (``partition-id``,
``num-partitions``), and it assembles the run as the simulator does
(:class:`~lptfl.experiment.assembly.RunAssembly` with ``num_clients = num-partitions``): the same
partition, precision policy, ``--compile`` decision and FL algorithm's client side
(:class:`~lptfl.fl.client_algorithm.ClientAlgorithm`). The update is
:func:`lptfl.flower.train_low_precision`, seeded with ``derive_seed(seed, round, partition_id)``
like the simulator, at the round's learning rate from the train config; it keeps the optimizer
state (the paper's persistent Adam moments) and FedBN's batch norm in the node's
``Context.state``. A train message for another partition than this node's is refused.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lptfl.experiment.allocator import keep_freed_memory
from lptfl.experiment.assembly import RunAssembly
from lptfl.experiment.config import RunConfig
from lptfl.experiment.setup import build_run_model
from lptfl.flower.config import from_flower_config
from lptfl.flower.partitions import METRICS_RECORD
from lptfl.flower.payload import GENERATOR_RECORD, from_record
from lptfl.flower.training import train_low_precision

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


@functools.lru_cache(maxsize=2)
def _assembly(settings: tuple) -> RunAssembly:
    """The run of ``settings`` (a config's sorted items) as one client's round sees it, cached for
    engines that reuse the process."""
    return RunAssembly(RunConfig(**dict(settings)), one_client_round=True)


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
    run = _assembly(tuple(sorted(asdict(replace(config, num_clients=num_partitions)).items())))
    x, y = run.client_data(partition_id)
    model = build_run_model(config, run.data)
    algorithm = run.client_algorithm(model)
    if algorithm.objective is not None:
        algorithm.begin_round(from_record(msg.content.array_records[GENERATOR_RECORD]),
                              float(settings["fedgen-alpha"]), float(settings["fedgen-beta"]), settings["fedgen-labels"])
    counts = algorithm.label_counts(y)
    extra = {"partition-id": partition_id, **({} if counts is None else {"label-counts": counts.tolist()})}
    return train_low_precision(
        msg, context, model, (x, y), policy=run.policy, epochs=config.epochs, batch_size=config.batch_size,
        lr=float(settings["lr"]), optimizer=config.optimizer, keep_optimizer_state=config.client_state != "none",
        compress=config.compress, seed=run.seed_for(int(settings["server-round"]), partition_id), device=run.device,
        compile=run.plan.train, compile_mode=config.compile_mode, keep_local=algorithm.local_names,
        objective=algorithm.objective, metrics=extra,
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition (the server samples partitions like the simulator samples clients)."""
    partition_id, num_partitions = node_partition(context)
    metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


__all__ = ["app", "node_partition", "query", "train"]
