"""The ClientApp: 8-bit local training and evaluation of this SuperNode's digits with lptfl."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from digits_app.task import make_model, make_policy, test_set, train_partition
from lptfl.flower import evaluate_low_precision, train_low_precision

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with the packed update."""
    cfg = context.run_config
    data = train_partition(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    return train_low_precision(
        msg, context, make_model(), data,
        policy=make_policy(cfg),
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(msg.content["config"]["lr"]),
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on the held-out digits."""
    return evaluate_low_precision(msg, make_model(), test_set(), policy=make_policy(context.run_config))
