"""The machine record of a run's summary (lptfl.experiment.results.machine)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from lptfl.experiment.results import cpu_model, machine


def test_cpu_model_reads_the_model_name_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n")
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_without_a_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: \n")
    assert cpu_model(info) == platform.processor()
    assert cpu_model(tmp_path / "missing") == platform.processor()


def test_machine_records_where_a_cpu_run_ran():
    """Each entry against what the machine says about itself, not against the functions ``machine``
    calls: the thread count the test sets, and the CPU's model and bf16 flags from /proc/cpuinfo."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = machine("cpu")
    finally:
        torch.set_num_threads(threads)
    json.dumps(info)  # it goes into summary.json
    assert info["device"] == "cpu" and "accelerator" not in info and info["torch_threads"] == 1
    assert info["torch"] == torch.__version__ and info["platform"] == platform.platform()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    fields = [line.partition(":") for line in cpuinfo]
    names = [value.strip() for key, _, value in fields if key.strip() == "model name" and value.strip()]
    flags = {flag for key, _, value in fields if key.strip() == "flags" for flag in value.split()}
    assert info["processor"] == (names[0] if names else platform.processor())
    assert info["cpus"] == sum(1 for key, _, _ in fields if key.strip() == "processor")
    assert info["fast_bf16"] is bool(flags & {"avx512_bf16", "amx_bf16"})
