"""Experiment trackers (``--log tensorboard`` / ``--log wandb``): each round's metrics, the config
and the curves, beside the run folder's own files. The tracker's package is imported only when a
run asks for it (optional extras ``lptfl[tensorboard]``, ``lptfl[wandb]``)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Protocol

from lptfl.experiment.config import RunConfig
from lptfl.experiment.run_dir import TENSORBOARD

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerError(ValueError):
    """The tracker's package is not installed, or cannot start (e.g. wandb without a login)."""


class Tracker(Protocol):
    def log_round(self, metrics: dict) -> None: ...

    def finish(self, curves: Path) -> None: ...


def _scalars(metrics: dict) -> dict[str, float]:
    """The round's finite numeric metrics (lists, nulls and names left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round" and math.isfinite(v)}


class TensorBoardTracker:
    """Event files under ``<out>/tensorboard``: a scalar per metric per round, the config as text,
    the curves as an image."""

    def __init__(self, out_dir: Path, config: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD))
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=1) + "\n```")

    def log_round(self, metrics: dict) -> None:
        for name, value in _scalars(metrics).items():
            self.writer.add_scalar(name, value, global_step=metrics["round"])
        self.writer.flush()

    def finish(self, curves: Path) -> None:
        if curves.exists():
            import matplotlib.image

            self.writer.add_image("curves", matplotlib.image.imread(str(curves))[..., :3], dataformats="HWC")
        self.writer.close()


class WandbTracker:
    """A wandb run in project ``lptfl`` named after the run folder (its files under ``<out>/wandb``;
    ``WANDB_MODE=offline`` keeps everything local)."""

    def __init__(self, out_dir: Path, config: RunConfig) -> None:
        import wandb

        self.wandb = wandb
        try:
            self.run = wandb.init(project="lptfl", name=out_dir.name, dir=str(out_dir), config=config.to_dict(),
                                  resume="allow", id=f"lptfl-{config.fingerprint()}-{out_dir.name}"[:64])
        except wandb.errors.Error as err:  # the user's set-up (no API key, no network), not a bug
            raise TrackerError(f"--log wandb cannot start: {err} (run `wandb login`, or set "
                                      "WANDB_MODE=offline to log locally)") from None

    def log_round(self, metrics: dict) -> None:
        self.run.log(_scalars(metrics), step=metrics["round"])

    def finish(self, curves: Path) -> None:
        if curves.exists():
            self.run.log({"curves": self.wandb.Image(str(curves))})
        self.run.finish()


def check_tracker(kind: str) -> None:
    """Refuse ``--log kind`` when its package is not installed, before a run starts.

    Raises:
        TrackerError: naming the package and the install command.
    """
    if kind == "none":
        return
    try:
        importlib.import_module(PACKAGES[kind])
    except ImportError:
        raise TrackerError(f"--log {kind} needs the {PACKAGES[kind]} package: "
                                  f"pip install 'lptfl[{kind}]'") from None


def open_tracker(kind: str, out_dir: Path, config: RunConfig) -> Tracker | None:
    """The tracker ``--log`` names (None for ``none``)."""
    check_tracker(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(out_dir, config)
    if kind == "wandb":
        return WandbTracker(out_dir, config)
    return None
