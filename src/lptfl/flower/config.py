"""The Flower run config <-> :class:`~lptfl.experiment.config.RunConfig` (no Flower import here).

A Flower run config is a flat mapping of scalars. Every :class:`RunConfig` field that the Flower
driver uses (its ``drivers``) is a key, spelled with dashes (``c-rounds``, ``model-width``; the
underscore spelling is accepted too), plus a few keys of the Flower driver itself
(:class:`FlowerOptions`). Flower only accepts override keys that exist in the app's defaults
(``[tool.flwr.app.config]``), so :func:`default_app_config` lists them all;
``python -m lptfl.flower.config pyproject.toml`` writes that section there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any

from lptfl.experiment.config import ConfigError, RunConfig, checked_value, field_kind, unknown_key

_SOURCE = "run config"


@dataclass
class FlowerOptions:
    """Settings of the Flower driver that are not part of the algorithm.

    Attributes:
        out_dir: where the ServerApp writes ``metrics.jsonl`` and ``summary.json`` ("" : none).
        min_nodes: SuperNodes that must be connected before round 1.
        round_timeout: seconds to wait for a round's replies (0: no limit).
        wait_nodes_timeout: seconds to wait for ``min_nodes`` SuperNodes (0: no limit).
    """

    out_dir: str = ""
    min_nodes: int = 1
    round_timeout: float = 600.0
    wait_nodes_timeout: float = 300.0

    def validate(self) -> None:
        if self.min_nodes < 1:
            raise ValueError(f"min-nodes must be >= 1, got {self.min_nodes}")
        for name in ("round_timeout", "wait_nodes_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_key(name)} must be >= 0 seconds (0: no limit), got {getattr(self, name)}")


def _key(name: str) -> str:
    return name.replace("_", "-")


def flower_settings() -> dict[str, Field]:
    """The :class:`RunConfig` fields that the Flower driver uses, by name."""
    return {f.name: f for f in fields(RunConfig) if "flower" in f.metadata["drivers"]}


def from_flower_config(run_config: dict[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Split a Flower run config into the run's :class:`RunConfig` and the driver options.

    Keys may use dashes or underscores. Every value must have its field's type (nothing is
    converted but an integer where a number belongs), and unknown keys are an error naming the
    nearest key: a typo must not fall back to a default.

    Raises:
        ConfigError: a value of the wrong type or out of range ("run config: frac: expected ...").
        ValueError: an unknown key.
    """
    run_fields = flower_settings()
    option_fields = {f.name: f for f in fields(FlowerOptions)}
    run_values: dict[str, Any] = {}
    option_values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in run_fields:
            run_values[name] = checked_value(key, field_kind(run_fields[name]), value, _SOURCE)
        elif name in option_fields:
            option_values[name] = checked_value(key, field_kind(option_fields[name]), value, _SOURCE)
        else:
            raise unknown_key(key, [_key(n) for n in (*run_fields, *option_fields)], _SOURCE)
    config = RunConfig.from_dict(run_values)
    try:
        config.validate()
    except ConfigError as err:
        raise err.at(_SOURCE) from None
    options = FlowerOptions(**option_values)
    options.validate()
    return config, options


def to_flower_config(config: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The flat Flower run config (dashed keys) of ``config`` (the settings the Flower driver uses) and ``options``."""
    options = options or FlowerOptions()
    values = {_key(name): getattr(config, name) for name in flower_settings()}
    values.update({_key(f.name): getattr(options, f.name) for f in fields(FlowerOptions)})
    return values


def default_app_config() -> dict[str, Any]:
    """Defaults for ``[tool.flwr.app.config]``: digits, a small ConvNet, a few rounds."""
    config = RunConfig(dataset="digits", model_width=16, c_rounds=3, num_clients=2, frac=1.0)
    return to_flower_config(config, FlowerOptions())


def toml_table(values: dict[str, Any]) -> str:
    """``values`` (scalars) as the lines ``key = value`` of a TOML table."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


if __name__ == "__main__":  # print the section; with a pyproject.toml's path, rewrite that file's (its last table)
    section = "[tool.flwr.app.config]\n" + toml_table(default_app_config())
    if len(sys.argv) < 2:
        print(section, end="")
    else:
        text = Path(sys.argv[1]).read_text(encoding="utf-8")
        Path(sys.argv[1]).write_text(text[:text.index("[tool.flwr.app.config]\n")] + section, encoding="utf-8")
