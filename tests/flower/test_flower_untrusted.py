"""The ServerApp trusts nothing a client sends, on a live local federation: a SuperLink and
three SuperNodes on 127.0.0.1 running lptfl's ServerApp with a ClientApp whose last
partition misbehaves differently each round of an 8-bit run. Each bad reply is rejected (or,
for a raising ClientApp, counted as failed), the two good updates of the round are averaged,
and the run completes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lptfl.experiment.config import RunConfig
from lptfl.experiment.results import read_metrics
from lptfl.flower.config import FlowerOptions, to_flower_config
from lptfl.flower.local import CLIENT_APP, LocalFederation, write_app

# round r: the bad node's reply (partition 2 of 3) in the way CASES[r - 1] says
CASES = ["nan-count", "huge-count", "wrong-partition", "fp32-upload", "nan-weights", "raises"]

BAD_CLIENT = '''
"""lptfl's ClientApp, but the last partition's reply is bad in a different way each round."""

import struct
import zlib

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lptfl import codec
from lptfl.flower import client_app as real
from lptfl.flower.config import from_flower_config
from lptfl.flower.payload import from_record, to_record

CASES = {cases!r}
MARKER = 1234.5678  # a raw batch-norm statistic, replaced by NaN in the bytes

app = ClientApp()
app.query()(real.query)


def nan_weights(payload, context):
    """The update with a NaN in a raw (full-precision) entry, a valid checksum after it."""
    fmt = from_flower_config(dict(context.run_config))[0].policy().uplink
    state = codec.decode(payload)
    raw = [k for k in state if "running_mean" in k]
    state[raw[0]][0] = MARKER
    forged = codec.encode(state, fmt, full_precision=[k for k in state if "running" in k])
    forged = forged[:-4].replace(struct.pack("<f", MARKER), struct.pack("<f", float("nan")))
    return forged + struct.pack("<I", zlib.crc32(forged))


@app.train()
def train(msg, context):
    partition, count = real.node_partition(context)
    if partition != count - 1:
        return real.train(msg, context)
    case = CASES[int(msg.content["config"]["server-round"]) - 1]
    if case == "raises":
        raise RuntimeError("a failing client")
    reply = real.train(msg, context)
    payload = from_record(reply.content.array_records["arrays"])
    metrics = dict(reply.content.metric_records["metrics"])
    if case == "nan-count":
        metrics["num-examples"] = float("nan")
    elif case == "huge-count":
        metrics["num-examples"] = 10**15
    elif case == "wrong-partition":
        metrics["partition-id"] = 0
    elif case == "fp32-upload":
        payload = codec.encode(codec.decode(payload), None)
    elif case == "nan-weights":
        payload = nan_weights(payload, context)
    return Message(RecordDict({{"arrays": to_record(payload), "metrics": MetricRecord(metrics)}}), reply_to=msg)
'''


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group ``pgid`` (one this test started)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def bad_app(app_dir: Path, config: RunConfig, options: FlowerOptions) -> Path:
    """lptfl's app with the bad ClientApp (``bad_client.py`` in the app directory)."""
    write_app(app_dir, to_flower_config(config, options))
    project = app_dir / "pyproject.toml"
    text = project.read_text()
    assert f'clientapp = "{CLIENT_APP}"' in text
    project.write_text(text.replace(f'clientapp = "{CLIENT_APP}"', 'clientapp = "bad_client:app"'))
    (app_dir / "bad_client.py").write_text(BAD_CLIENT.format(cases=CASES))
    return app_dir


@pytest.mark.slow
def test_bad_replies_on_a_live_federation_are_rejected_and_the_run_completes(tmp_path: Path):
    out = tmp_path / "out"
    config = RunConfig(dataset="digits", model_width=8, model_norm="batchnorm", use_quantization=True,
                       quantization_bits=8, moving_average=True, frac=1.0, batch_size=64, compile="off",
                       c_rounds=len(CASES), num_clients=3)
    options = FlowerOptions(out_dir=str(out), min_nodes=3, round_timeout=120)
    with LocalFederation(3, home=tmp_path / "home") as federation:
        groups = [p.pid for p in federation.processes]  # each started in its own session/group
        run_id = federation.submit(bad_app(federation.home / "app", config, options))
        entry = federation.wait(run_id, timeout=400, poll_s=1.0)
        logs = "" if entry.get("status") == "finished:completed" else federation.logs(run_id)[-4000:]
    assert entry.get("status") == "finished:completed", f"{entry}\n{logs}"
    deadline = time.monotonic() + 20
    while (alive := [g for g in groups if group_alive(g)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"process groups left running: {alive}"

    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == list(range(1, len(CASES) + 1))
    expected_reason = {
        "nan-count": "metric 'num-examples' must be finite, got nan",
        "huge-count": "num-examples 1000000000000000 is not the",
        "wrong-partition": "partition-id 0 is not the partition 2 assigned to node",
        "fp32-upload": "expected bfp8e8-BC-FC, got a raw record",
        "nan-weights": "'features.1.running_mean': raw F32 data holds NaN or infinite values",
        "raises": "a failing client",
    }
    for case, r in zip(CASES, rounds):
        assert r["accepted"] == 2 and r["clients"] == [0, 1] and not r["skipped"], (case, r)
        assert (r["rejected"], r["errors"]) == ((0, 1) if case == "raises" else (1, 0)), (case, r)
        (reason,) = r["rejected_reasons"]
        assert expected_reason[case] in reason, (case, reason)
        assert r["test_accuracy"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == len(CASES) and summary["rejected_updates_total"] == len(CASES) - 1
