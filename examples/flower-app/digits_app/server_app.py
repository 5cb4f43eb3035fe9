"""The ServerApp: FedAvg with 8-bit payloads, float64 aggregation and the server moving average."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from digits_app.task import make_model, make_policy, test_set
from lptfl.flower import LowPrecisionFedAvg

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy (fraction 0-1) of the served model on the held-out digits."""
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = test_set()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return MetricRecord({"accuracy": accuracy})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = LowPrecisionFedAvg(
        policy=make_policy(cfg),
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=int(cfg["min-nodes"]),
        min_evaluate_nodes=int(cfg["min-nodes"]),
        min_available_nodes=int(cfg["min-nodes"]),
        moving_average=cfg["moving-average"],
        moving_weight=float(cfg["moving-weight"]),
    )
    model = make_model()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        evaluate_fn=central_evaluate,
    )
    if cfg["results-path"]:
        rounds = [
            {"round": r, **dict(result.train_metrics_clientapp.get(r, {})),
             "accuracy": result.evaluate_metrics_serverapp[r]["accuracy"]}
            for r in sorted(result.evaluate_metrics_serverapp)
        ]
        fp32_bytes = sum(4 * v.numel() for v in model.state_dict().values())
        Path(str(cfg["results-path"])).write_text(json.dumps({"fp32-bytes": fp32_bytes, "rounds": rounds}, indent=1))
