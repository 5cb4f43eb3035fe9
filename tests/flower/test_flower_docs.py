"""``docs/flower.md``: its app is ``examples/flower-app`` verbatim, and that app (an MLP lptfl
has never seen) trains in 8 bits with the moving average: here in process, through Flower's
``Strategy.start`` and the app's own ServerApp and ClientApp functions."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from _loopback_grid import LoopbackGrid
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flower-app"
DOC = ROOT / "docs" / "flower.md"


@pytest.fixture()
def example_app():
    """The example's package ``digits_app``, imported from the example directory."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sys.path.insert(0, str(EXAMPLE))
    try:
        from digits_app import client_app, server_app

        yield client_app, server_app
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "digits_app" or m.startswith("digits_app.")]:
            del sys.modules[name]
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_the_doc_shows_the_example_files_verbatim():
    blocks = re.findall(r"```python\n# (digits_app/\w+\.py)\n(.*?)```", DOC.read_text(), flags=re.S)
    assert sorted(name for name, _ in blocks) == ["digits_app/client_app.py", "digits_app/server_app.py",
                                                    "digits_app/task.py"]
    for name, code in blocks:
        assert code == (EXAMPLE / name).read_text(), f"docs/flower.md's {name} differs from examples/flower-app"


def test_the_doc_app_trains_in_8_bits_with_the_moving_average(example_app, tmp_path):
    client_app, server_app = example_app
    run_config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["bits"] == 8 and run_config["moving-average"] is True
    run_config = {**run_config, "results-path": str(tmp_path / "results.json"), "num-server-rounds": 3}
    nodes = {10 + i: Context(run_id=1, node_id=10 + i, node_config={"partition-id": i, "num-partitions": 2},
                             state=RecordDict(), run_config=run_config) for i in range(2)}

    def client(msg: Message) -> Message:
        handler = client_app.train if msg.metadata.message_type == "train" else client_app.evaluate
        return handler(msg, nodes[msg.metadata.dst_node_id])

    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(LoopbackGrid(nodes, client), server_context)

    results = json.loads((tmp_path / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    for r in (1, 2, 3):
        assert rounds[r]["accepted"] == 2 and rounds[r]["skipped"] == 0
        assert 0.24 < rounds[r]["bytes-down-per-client"] / results["fp32-bytes"] < 0.30
        assert 0.24 < rounds[r]["bytes-up"] / 2 / results["fp32-bytes"] < 0.30
    accuracy = [rounds[r]["accuracy"] for r in (0, 1, 2, 3)]
    assert accuracy[3] > accuracy[1] > accuracy[0] + 0.3, accuracy
