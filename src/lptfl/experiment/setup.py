"""What every driver of a run derives from its config: seeds, client sampling, dropouts, the
learning-rate schedule, the clients' partition (and ABAvg's validation split), the model.

The simulator (:mod:`lptfl.sim`) and the Flower apps (:mod:`lptfl.flower`) both call these, so
the same config gives the same clients, data and initial model under either driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lptfl.data import Dataset, dirichlet_partition, iid_partition
from lptfl.experiment.config import RunConfig, clients_per_round
from lptfl.experiment.results import LAST_ROUNDS
from lptfl.fl.algorithms import validation_split
from lptfl.fl.seeds import DROPOUT_TAG, INIT_TAG, SAMPLING_TAG, derive_seed
from lptfl.models import build_model


def check_device(name: str) -> None:
    """Refuse a ``--device`` this machine does not have (``cuda`` without a CUDA GPU, ``cuda:3`` of two).

    Raises:
        ValueError: naming the device, what this machine has, and the fix.
    """
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: {built}; use --device cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def sample_clients(num_clients: int, frac: float, seed: int, round_index: int) -> list[int]:
    """:func:`~lptfl.experiment.config.clients_per_round` distinct clients, uniformly without replacement."""
    m = clients_per_round(num_clients, frac)
    rng = np.random.default_rng(derive_seed(seed, round_index, SAMPLING_TAG))
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def client_fails(seed: int, round_index: int, client: int, probability: float) -> bool:
    """Whether sampled ``client`` fails to reply in ``round_index`` (``--dropout``): a draw from
    ``derive_seed(seed, round, client, tag)``, so it is reproducible and independent of history."""
    if probability <= 0:
        return False
    return derive_seed(seed, round_index, client, DROPOUT_TAG) / float(1 << 63) < probability


def learning_rate(base: float, schedule: str, round_index: int, rounds: int) -> float:
    """Learning rate of round ``round_index`` (1-based): constant, cosine to 0, or x0.1 at 50% and 75%."""
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (round_index - 1) / rounds))
    if schedule == "step":
        return base * (0.1 ** sum(round_index > f * rounds for f in (0.5, 0.75)))
    return base


def partition_data(config: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Client index arrays by ``config.partition``."""
    if config.num_clients > len(labels):
        raise ValueError(
            f"--num_clients {config.num_clients} exceeds the {len(labels)} training samples of {config.dataset}"
        )
    if config.partition == "iid":
        return iid_partition(len(labels), config.num_clients, seed=config.seed)
    return dirichlet_partition(
        labels, config.num_clients, config.alpha, seed=config.seed, balance=config.partition == "dirichlet"
    )


def split_clients(config: RunConfig, labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
    """``(client index arrays into the training set, server validation indices or None)``.

    ABAvg (unless it scores on the test set) holds a validation split out of the training set
    first, and the clients share the rest; every other mode partitions the whole set.
    """
    if config.aggregation_mode == "abavg" and not config.abavg_use_test_set:
        pool, val = validation_split(len(labels), config.abavg_val_fraction, config.seed)
        if config.num_clients > len(pool):
            raise ValueError(f"--num_clients {config.num_clients} exceeds the {len(pool)} training samples that "
                             f"--abavg_val_fraction {config.abavg_val_fraction:g} leaves of {config.dataset}")
        return [pool[p] for p in partition_data(config, labels[pool])], val
    return partition_data(config, labels), None


def validation_data(config: RunConfig, data: Dataset, val: np.ndarray | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ABAvg's server-held ``(x, y)``: the held-out ``val`` rows, or the test set when
    ``--abavg_use_test_set``; ``(None, None)`` for the other modes."""
    if config.aggregation_mode != "abavg":
        return None, None
    if config.abavg_use_test_set:
        return data.test_x, data.test_y
    index = torch.from_numpy(val)
    return data.train_x[index], data.train_y[index]


def build_run_model(config: RunConfig, data: Dataset) -> torch.nn.Module:
    """The model of the run, with parameters initialised from ``config.seed``."""
    channels, height, _ = data.input_shape
    options = {"width": config.model_width} if config.model_width and config.model_name.lower() == "convnet" else {}
    if config.model_norm and config.model_name.lower() == "convnet":
        options["norm"] = config.model_norm
    if config.model_width and config.model_name.lower() == "mlp":
        options = {"hidden": config.model_width}
    torch.manual_seed(derive_seed(config.seed, INIT_TAG))
    return build_model(config.model_name, channels, data.num_classes, height, **options)


# --compile auto on a CPU: below these totals a run is done sooner eagerly (measured in docs/compile.md)
COMPILE_MIN_STEPS = 1000
COMPILE_MIN_EVAL_SAMPLES = 10_000


@dataclass(frozen=True)
class CompilePlan:
    """Which parts of a run ``torch.compile`` fuses: the local training step and the evaluation
    forward, and why (for the start-up log)."""

    train: bool
    eval: bool
    reason: str

    @property
    def parts(self) -> tuple[bool, bool]:
        """``(train, eval)``."""
        return self.train, self.eval


def mean_client_steps(config: RunConfig, client_sizes: list[int]) -> float:
    """Mean batches per local epoch over the clients (``client_sizes``: training samples per client)."""
    return sum(math.ceil(n / config.batch_size) for n in client_sizes) / max(len(client_sizes), 1)


def run_steps(config: RunConfig, client_sizes: list[int]) -> int:
    """About how many local steps the whole run takes: rounds x sampled clients x epochs x mean batches."""
    per_round = max(1, int(round(config.frac * config.num_clients)))
    return int(config.c_rounds * per_round * config.epochs * mean_client_steps(config, client_sizes))


def compile_plan(config: RunConfig, client_sizes: list[int], test_size: int, device: torch.device,
                 full_precision: bool, *, one_client_round: bool = False) -> CompilePlan:
    """``--compile``'s decision for a run: ``on`` / ``off`` as said; ``auto`` compiles nothing at full
    precision, everything on CUDA (a step there is kernel launches, which fusing cuts ~6x), and on a
    CPU each part whose work over the whole run reaches :data:`COMPILE_MIN_STEPS` local steps or
    :data:`COMPILE_MIN_EVAL_SAMPLES` scored test images. A compile is paid once per process, so the
    rule weighs the work of one process: the whole run for the simulator, one client's round for a
    Flower ClientApp (``one_client_round``: a fresh process per message, which compiles its training
    step only from :data:`COMPILE_MIN_STEPS` steps in that round, on any device). The estimate
    depends on the settings and the partition only, so a resumed run decides as the original did.

    Args:
        client_sizes: training samples per client.
        test_size: test images scored per evaluated round.
        one_client_round: decide for a process that trains one client for one round and scores nothing.
    """
    if config.compile != "auto":
        on = config.compile == "on"
        return CompilePlan(on, on, f"--compile {config.compile}")
    if full_precision:
        return CompilePlan(False, False, "--compile auto: nothing to fuse at full precision")
    if one_client_round:
        steps = int(config.epochs * mean_client_steps(config, client_sizes))
        return CompilePlan(steps >= COMPILE_MIN_STEPS, False, f"--compile auto for one client's round: ~{steps} "
                           f"local steps a process (compiled from {COMPILE_MIN_STEPS})")
    if device.type == "cuda":
        return CompilePlan(True, True, "--compile auto on CUDA")
    steps = run_steps(config, client_sizes)
    evaluated = sum(1 for r in range(1, config.c_rounds + 1)
                    if r % config.eval_every == 0 or r > config.c_rounds - LAST_ROUNDS)
    samples = evaluated * test_size
    reason = (f"--compile auto on a CPU: ~{steps} local steps (compiled from {COMPILE_MIN_STEPS}), "
              f"{samples} test images to score (compiled from {COMPILE_MIN_EVAL_SAMPLES})")
    return CompilePlan(steps >= COMPILE_MIN_STEPS, samples >= COMPILE_MIN_EVAL_SAMPLES, reason)
