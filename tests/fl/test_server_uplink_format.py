"""The server accepts updates only in the run's uplink format (``ServerConfig.uplink``)."""

from __future__ import annotations

import torch

from lptfl import codec
from lptfl.fl import Server, ServerConfig
from lptfl.quant import BFPFormat, quantize

FMT = BFPFormat(8, layout="B")


def test_updates_in_another_format_are_rejected_and_the_model_kept():
    gen = torch.Generator().manual_seed(0)
    initial = {"w": torch.zeros(4, 3), "bn.running_var": torch.ones(4), "steps": torch.tensor(0)}
    server = Server(initial, ServerConfig(uplink=FMT), full_precision=["bn.running_var"])
    good = {"w": quantize(torch.randn(4, 3, generator=gen), FMT), "bn.running_var": torch.full((4,), 2.0),
            "steps": torch.tensor(1)}
    server.begin_round()
    assert not server.receive(codec.encode(good, None), 1, "fp32")  # raw weights in an 8-bit run
    assert not server.receive(codec.encode(good, BFPFormat(6, layout="B"), full_precision=["bn.running_var"]), 1, "6-bit")
    assert not server.receive(codec.encode(good, FMT), 1, "bn quantized")  # statistics must travel raw
    assert server.stats.rejected == 3 and "expected bfp8e8-B-FC, got a raw record" in server.stats.reasons[0]
    assert not server.end_round() and torch.equal(server.global_state["w"], initial["w"])
    server.begin_round()
    assert server.receive(codec.encode(good, FMT, full_precision=["bn.running_var"]), 1, "right")
    assert server.end_round() and torch.equal(server.global_state["w"], good["w"])


def test_without_an_uplink_format_any_format_is_accepted():
    server = Server({"w": torch.zeros(2, 2)}, ServerConfig(), full_precision=[])
    server.begin_round()
    assert server.receive(codec.encode({"w": torch.ones(2, 2)}, FMT), 1)
    assert server.receive(codec.encode({"w": torch.ones(2, 2)}, None), 1)
