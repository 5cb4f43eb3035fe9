"""The Flower run config <-> :class:`~lptfl.experiment.config.RunConfig` (no Flower import here).

A Flower run config is a flat mapping of scalars. Every :class:`RunConfig` field is a key,
spelled with dashes (``c-rounds``, ``model-width``; the underscore spelling is accepted too),
plus a few keys of the Flower driver itself (:class:`FlowerOptions`). Flower only accepts
override keys that exist in the app's defaults (``[tool.flwr.app.config]``), so
:func:`default_app_config` lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lptfl.experiment.config import RunConfig


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
        if self.round_timeout < 0 or self.wait_nodes_timeout < 0:
            raise ValueError("round-timeout and wait-nodes-timeout must be >= 0 (0: no limit)")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{_key(name)} must be a boolean, got {value!r}")
        return bool(value)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{_key(name)} must be an integer, got {value!r}")
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)


def from_flower_config(run_config: dict[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Split a Flower run config into the run's :class:`RunConfig` and the driver options.

    Keys may use dashes or underscores; unknown keys are an error (a typo must not silently
    fall back to a default).
    """
    run_fields = {f.name: f for f in fields(RunConfig)}
    option_fields = {f.name: f for f in fields(FlowerOptions)}
    run_values: dict[str, Any] = {}
    option_values: dict[str, Any] = {}
    unknown = []
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in run_fields:
            run_values[name] = _coerce(name, run_fields[name].type, value)
        elif name in option_fields:
            option_values[name] = _coerce(name, option_fields[name].type, value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown run-config keys {sorted(unknown)}")
    config = RunConfig.from_dict(run_values)
    config.validate()
    options = FlowerOptions(**option_values)
    options.validate()
    return config, options


def to_flower_config(config: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The flat Flower run config (dashed keys) of ``config`` and ``options``."""
    options = options or FlowerOptions()
    values = {_key(f.name): getattr(config, f.name) for f in fields(RunConfig)}
    values.update({_key(f.name): getattr(options, f.name) for f in fields(FlowerOptions)})
    return values


def default_app_config() -> dict[str, Any]:
    """Defaults for ``[tool.flwr.app.config]``: digits, a small ConvNet, a few rounds."""
    config = RunConfig(dataset="digits", model_width=16, c_rounds=3, num_clients=2, frac=1.0)
    return to_flower_config(config, FlowerOptions())
