"""The Flower app config is generated from the settings' declarations (issue 32, point 2)."""

import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from lptfl.experiment.config import RunConfig
from lptfl.flower.config import FlowerOptions, default_app_config, from_flower_config, to_flower_config

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_app_config_is_the_generated_defaults_keys_and_values(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    section = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    typed = lambda values: {k: (type(v), v) for k, v in values.items()}  # noqa: E731 (1 and 1.0 differ)
    assert typed(section) == typed(default_app_config()), "run: python -m lptfl.flower.config pyproject.toml"
    stale = tmp_path / "pyproject.toml"
    stale.write_text(text.replace("c-rounds = 3\n", "c-rounds = 4\nretired = 1\n"))
    subprocess.run([sys.executable, "-m", "lptfl.flower.config", str(stale)], check=True)
    assert stale.read_text() == text


def test_the_app_config_holds_the_settings_of_the_flower_driver_and_its_options():
    flower = {f.name.replace("_", "-") for f in fields(RunConfig) if "flower" in f.metadata["drivers"]}
    options = {f.name.replace("_", "-") for f in fields(FlowerOptions)}
    assert set(default_app_config()) == flower | options
    assert {"dropout", "log", "cohort"}.isdisjoint(default_app_config())
    assert {"c-rounds", "compile", "min-clients", "checkpoint-every"} <= set(default_app_config())
    config = RunConfig(dropout=0.3, seed=5)  # a simulator-only setting stays out of the Flower run
    assert from_flower_config(to_flower_config(config))[0] == RunConfig(seed=5)
