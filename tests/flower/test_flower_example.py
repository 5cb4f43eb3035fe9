"""``examples/flower-app`` on a local deployment: a SuperLink and two SuperNodes on 127.0.0.1,
``flwr run`` of the example project for 3 rounds. Its 8-bit payloads are about a quarter of
fp32 and its accuracy rises; every process the test started is gone afterwards."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lptfl.flower.local import LocalFederation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower-app"


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user reuses the id: not ours
        return False
    return True


def test_example_app_three_rounds_on_a_local_deployment(tmp_path: Path):
    results = tmp_path / "results.json"
    with LocalFederation(2, home=tmp_path / "home") as federation:
        groups = [p.pid for p in federation.processes]  # each started in its own session/group
        # no federated evaluation here (it adds a message exchange per round; tests/flower/
        # test_flower_strategy.py covers it): the accuracy is the ServerApp's central one
        overrides = {"results-path": str(results), "num-server-rounds": 3, "fraction-evaluate": 0.0}
        run_id = federation.submit(EXAMPLE, overrides)
        entry = federation.wait(run_id, timeout=150, poll_s=1.0)
        logs = "" if entry.get("status") == "finished:completed" else federation.logs(run_id)[-4000:]
    assert entry.get("status") == "finished:completed", f"{entry}\n{logs}"
    deadline = time.monotonic() + 20
    while (alive := [g for g in groups if group_alive(g)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"process groups left running: {alive}"

    summary = json.loads(results.read_text())
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    fp32 = summary["fp32-bytes"]
    for r in (1, 2, 3):
        m = rounds[r]
        assert m["accepted"] == 2 and m["rejected"] == 0 and m["failed"] == 0 and m["skipped"] == 0
        assert 0.22 < m["bytes-down-per-client"] / fp32 < 0.30, m
        assert 0.22 < m["bytes-up"] / 2 / fp32 < 0.30, m
        assert m["state-restored"] == (0 if r == 1 else 1)  # optimizer state kept in Context.state
    accuracy = [rounds[r]["accuracy"] for r in (0, 1, 2, 3)]
    assert accuracy[3] > accuracy[1] > accuracy[0] + 0.3, accuracy
    assert accuracy[3] > 0.8, accuracy
