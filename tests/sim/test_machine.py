"""The machine record of a run's summary (lptfl.experiment.results.machine)."""

from __future__ import annotations

import platform

import torch

from lptfl.experiment.results import cpu_model, machine
from lptfl.quant.compute import fast_bf16_available


def test_cpu_model_reads_the_model_name_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n")
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_without_a_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: \n")
    assert cpu_model(info) == platform.processor()
    assert cpu_model(tmp_path / "missing") == platform.processor()


def test_machine_records_the_compute_path():
    info = machine("cpu")
    assert info["device"] == "cpu" and info["cpus"] >= 1
    assert info["fast_bf16"] is fast_bf16_available("cpu")
    assert info["processor"] == cpu_model() and info["torch_threads"] == torch.get_num_threads()
