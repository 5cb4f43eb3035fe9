"""The configuration of one federated run, with the published entry point's flag names.

Each setting is declared once, as a field of :class:`RunConfig` made by :func:`setting`, with all
that is said of it: its type (the annotation), its help and ``--help`` group, an interval or a list
of choices, the published entry point's name where that differs, whether it is part of the
fingerprint, whether a resume may change it and which drivers use it. From that declaration come
the command line (:mod:`lptfl.cli`), the checks, the fingerprint, the resume whitelist and the
Flower app config (:mod:`lptfl.flower.config`). Every value that comes from outside (a TOML or
JSON file, a run's saved ``config.json``, a Flower run config) passes :meth:`RunConfig.from_dict`,
which refuses unknown keys and values of another type (nothing is converted but an integer where a
number belongs); :meth:`RunConfig.validate` checks the ranges. Both raise :class:`ConfigError`,
which names the key, what was expected and the value given.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lptfl.data import DATASET_NAMES, canonical_name
from lptfl.fl.algorithms import AGGREGATION_MODES, MODE_ALIASES
from lptfl.fl.client import OPTIMIZERS
from lptfl.fl.fedftg import FedFTGConfig
from lptfl.fl.fedgen import FedGenConfig
from lptfl.fl.robust import ROBUST_MODES
from lptfl.fl.server import WEIGHTINGS, ServerConfig
from lptfl.fl.server_optim import SERVER_OPTIMIZERS
from lptfl.models import MODELS
from lptfl.models.convnet import NORMS
from lptfl.quant import PrecisionPolicy
from lptfl.quant.format import LAYOUTS, ROUNDINGS, SMALL_BLOCKS
from lptfl.quant.policy import COMPUTE_MODES, DOWNLINK_MODES

log = logging.getLogger(__name__)

PARTITIONS = ("dirichlet", "dirichlet-plain", "iid")
LR_SCHEDULES = ("none", "cosine", "step")
CLIENT_STATES = ("auto", "memory", "disk", "none")
COMPILE_MODES = ("auto", "on", "off")
TRACKERS = ("none", "tensorboard", "wandb")  # experiment trackers of lptfl.experiment.tracking
# train a round's clients as one batched model (lptfl.fl.cohort): auto = on CUDA, where one step
# is kernel launches; on a CPU the batched convolutions are slower than one client's at a time
COHORT_MODES = ("auto", "on", "off")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODEL_NORMS = ("", *NORMS)  # "": the model's own
# Which of the served model's two test scores (fp32 activations, the run's activation format; both
# are kept every evaluated round) is `test_accuracy` / `test_loss`: "paper" (the published code's
# protocol: fp32 activations with the moving average, the run's format without it), "policy" (the
# run's format always; what every run before both scores were kept recorded) or "full" (fp32 always)
EVAL_PRECISIONS = ("paper", "policy", "full")

# Flags of the published entry point (its args.py) that change nothing here: name -> (type, its
# default there, why). A value other than that default is accepted with a logged note.
PUBLISHED_NO_OPS: dict[str, tuple[str, Any, str]] = {
    "config_save_name": ("str", None, "the settings of every run are saved as config.json in --out"),
    "project_name": ("str", "quant FL", "a wandb project name; lptfl writes its results to --out"),
    "run_name": ("str", None, "a wandb run name; lptfl names a run by its --out"),
    "result_path": ("str", None, "results go to --out"),
    "acc_path": ("str", None, "results go to --out"),
    "checkpoint_path": ("str", None, "checkpoints go to --out (see --checkpoint_every)"),
    "ipc": ("int", 15, "the published script never reads it"),
    "classes": ("ints", None, "the published script never reads it"),
    "m": ("int", 6, "the published script never reads it (--quantization_bits is the word length)"),
    "ensemble_alpha": ("float", 1, "FedGen's generator weighs its teacher loss by 1 here (the published default)"),
    "ensemble_beta": ("float", 0, "FedGen's generator has no student term here (the published default 0)"),
    "ensemble_epoch": ("int", 50, "the published script never reads it"),
    "use_embedding": ("int", 0, "FedGen's generator takes one-hot labels here (the published default 0)"),
    "coef_decay_epoch": ("int", 1, "FedGen's coefficients decay every round here (the published default 1)"),
    "min_samples_per_label": ("int", 1, "FedGen's generator draws every class the round's clients hold"),
    "test_client": ("bool", False, "it logs one client's loss to wandb"),
    "client_id": ("int", 0, "the client --test_client logs"),
    "global_test": ("bool", False, "it renames a wandb key"),
}
# keys the published script adds to the JSON config it saves, besides its flags
PUBLISHED_DERIVED = ("config", "num_classes", "channel", "imsize")
# a published setting whose null (the flag not given) has a name here
_PUBLISHED_NULLS = {"lr_schedule": "none"}

_NEVER = object()  # equal to no value
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string"}
_INTERVAL = re.compile(r"([\[(])(-?[\d.e+-]+), (-?[\d.e+-]+|inf)([\])])")


class ConfigError(ValueError):
    """A setting with a value of the wrong type, or out of range.

    Attributes:
        key: the setting, as spelled where it was given.
        expected: what it must be ("an integer >= 1").
        value: the value given.
        source: the file or run config it came from; None: a command-line flag.
    """

    def __init__(self, key: str, expected: str, value: Any, source: str | None = None) -> None:
        self.key, self.expected, self.value, self.source = key, expected, value, source
        where = f"{source}: {key}" if source else f"--{key}"
        super().__init__(f"{where}: expected {expected}, got {shown(value)}")

    def at(self, source: str | None) -> ConfigError:
        """The same error, said of the value in ``source``."""
        return ConfigError(self.key, self.expected, self.value, source)


def shown(value: Any) -> str:
    """``value`` as a config file spells it (JSON), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# Options of the lptfl command rather than settings of a run: a config file cannot give them.
COMMAND_OPTIONS = ("config", "out", "overwrite", "quiet", "resume", "stop_after")


def unknown_key(key: str, names: Iterable[str], source: str | None) -> ValueError:
    """The error for a key that names no setting, suggesting the nearest name."""
    if key in COMMAND_OPTIONS:
        return ValueError(f"{source or 'config'}: {key}: an option of the command, not a setting of the run; "
                          f"give --{key} on the command line")
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f"did you mean {close[0]}?" if close else "see lptfl run --help for the settings"
    return ValueError(f"{source or 'config'}: {key}: unknown setting; {hint}")


def field_kind(f: Field) -> str:
    """The type name of a dataclass field: bool, int, float or str."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def checked_value(key: str, kind: str, value: Any, source: str | None = None) -> Any:
    """``value`` if it has the type ``kind`` (an integer is taken, as a float, where a number belongs).

    Raises:
        ConfigError: any other value ("false" for a bool, 4.0 for an int, NaN, ...).
    """
    if kind == "float" and type(value) is int and abs(value) <= 2**53:
        value = float(value)
    ok = {
        "bool": type(value) is bool,
        "int": type(value) is int,
        "float": type(value) is float and math.isfinite(value),
        "str": type(value) is str,
    }[kind]
    if not ok:
        raise ConfigError(key, _EXPECTED[kind], value, source)
    return value


def _within(value: float, interval: str) -> bool:
    low_bracket, low, high, high_bracket = _INTERVAL.fullmatch(interval).groups()
    above = value >= float(low) if low_bracket == "[" else value > float(low)
    below = value <= float(high) if high_bracket == "]" else value < float(high)
    return above and below


def _interval_words(kind: str, interval: str) -> str:
    """"an integer >= 1", "a number in (0, 1]"."""
    noun = "an integer" if kind == "int" else "a number"
    low_bracket, low, high, _ = _INTERVAL.fullmatch(interval).groups()
    if high == "inf":
        return f"{noun} {'>=' if low_bracket == '[' else '>'} {low}"
    return f"{noun} in {interval}"


# --help's groups of the settings, in order
CORE, PRECISION, ALGORITHMS, RELIABILITY, OUTPUT, PERFORMANCE = GROUPS = (
    "the paper's core flags", "precision", "algorithms", "reliability", "output", "performance")
DRIVERS = ("sim", "flower")  # the simulator (lptfl run) and the Flower apps


def setting(default: Any, group: str, help: str, *, within: str | None = None,
            choices: tuple[str, ...] | None = None, aliases: dict[str, str] | None = None,
            published: str | None = None, before: Any = None, resumable: bool = False,
            drivers: tuple[str, ...] = DRIVERS) -> Any:
    """A :class:`RunConfig` field with all that is said of it.

    Args:
        default: the value when none is given.
        group: its ``--help`` group (one of :data:`GROUPS`).
        help: its ``--help`` text.
        within: the interval a number must lie in, e.g. ``"(0, 1]"`` or ``"[1, inf)"``.
        choices: the values a string may take.
        aliases: other names of choices (the published code's spellings); with them the choices
            are matched regardless of case.
        published: the published entry point's name of this flag, where it differs.
        before: for a setting added after results were published, the value runs had before it
            existed: it is part of the fingerprint only when it differs from ``before`` (so older
            runs keep their fingerprints; a new setting must say this), and a saved config without
            it reads as ``before``. None: always part of the fingerprint.
        resumable: it changes where or how fast a run computes, or what it records, never its
            results: never part of the fingerprint, and a resume may change it.
        drivers: the drivers that use it (:data:`DRIVERS`); only theirs show it (``lptfl run``,
            ``lptfl flower-local``, the Flower app config).
    """
    metadata = {"group": group, "help": help, "within": within, "choices": choices, "aliases": aliases,
                "published": published, "before": before, "resumable": resumable or None, "drivers": drivers}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def added(default: Any, group: str, help: str, **checks: Any) -> Any:
    """A :func:`setting` added after results were published, whose older runs ran at ``default``."""
    return setting(default, group, help, before=default, **checks)


def scored_activations(eval_precision: str, moving_average: bool) -> str:
    """Which score of the served model is ``test_accuracy`` under ``--eval_precision`` (see
    :data:`EVAL_PRECISIONS`): ``"fp32_act"`` (no activation quantizers) or ``"policy_act"`` (the
    run's activation format)."""
    if eval_precision == "paper":
        return "fp32_act" if moving_average else "policy_act"
    return "fp32_act" if eval_precision == "full" else "policy_act"


@dataclass
class RunConfig:
    """Every setting of a run. Field names are the command-line flags (``--c_rounds`` ...)."""

    dataset: str = setting("digits", CORE, "digits (embedded, default), mnist, fmnist, cifar10, cifar100, cinic10")
    data_path: str = setting("./data", CORE, "directory holding the dataset files (torchvision layout for "
                             "MNIST/FMNIST)", resumable=True)
    download: bool = setting(False, CORE, "download missing dataset files from the official locations "
                             "(checksummed)", resumable=True)
    no_verify: bool = setting(False, RELIABILITY, "load dataset files whose md5 differs from the published one "
                              "(checked once per process)", resumable=True)
    alpha: float = setting(0.5, CORE, "Dirichlet concentration of the class split", within="(0, inf)")
    partition: str = setting("dirichlet", CORE, "dirichlet (balanced, the paper's), dirichlet-plain, iid",
                             choices=PARTITIONS)
    model_name: str = setting("ConvNet", CORE, "ConvNet, MLP, resnet8, resnet18")
    model_width: int = setting(0, CORE, "ConvNet channels / MLP hidden units (0: the paper's 128)", within="[0, inf)")
    c_rounds: int = setting(12, CORE, "communication rounds", within="[1, inf)")
    num_clients: int = setting(10, CORE, "clients in the federation", within="[1, inf)")
    frac: float = setting(0.5, CORE, "fraction of clients sampled per round, in (0, 1]", within="(0, 1]")
    epochs: int = setting(1, CORE, "local epochs per round", within="[1, inf)")
    batch_size: int = setting(32, CORE, "local training batch size", within="[1, inf)")
    test_batch_size: int = setting(1000, CORE, "evaluation batch size", within="[1, inf)")
    lr: float = setting(1e-3, CORE, "client learning rate", within="(0, inf)")
    lr_schedule: str = setting("none", CORE, "client learning rate over the rounds (CosineAnnealingLR: cosine)",
                               choices=LR_SCHEDULES, aliases={"CosineAnnealingLR": "cosine"})
    optimizer: str = setting("adam", CORE, "client optimizer: adam (the paper's), sgd (plain, as the published "
                             "SGD) or sgd-momentum (momentum 0.9); the published spellings in any case",
                             choices=OPTIMIZERS, aliases={})
    seed: int = setting(0, CORE, "seed of every random draw (partition, sampling, rounding, initialisation)",
                        within="[0, inf)")
    use_quantization: bool = setting(False, PRECISION, "low-precision local training and communication")
    quantization_bits: int = setting(8, PRECISION, "word length of weights, activations, gradients, errors "
                                     "(sign included)", within="[2, 16]")
    block_dim: str = setting("BC", PRECISION, "exponent layout of weights and gradients: BC, B or tensor",
                             choices=LAYOUTS)
    small_block: str = setting("FC", PRECISION, "FC, Conv or None: which small tensors use one exponent",
                               choices=SMALL_BLOCKS)
    quant_type: str = setting("stochastic", PRECISION, "stochastic or nearest rounding", choices=ROUNDINGS)
    downlink: str = added("nearest", PRECISION, "the served model Q(wbar) sent to clients: nearest (rounded to "
                          "nearest), stochastic (unbiased rounding, seeded per round) or fp32 (unquantized, as the "
                          "published code)", choices=DOWNLINK_MODES)
    use_mixed_precision: bool = setting(False, PRECISION, "separate word lengths from "
                                        "--weight/activation/grad_quantization_bits")
    weight_quantization_bits: int = setting(8, PRECISION, "with --use_mixed_precision: word length of the weights",
                                            within="[2, 16]")
    activation_quantization_bits: int = setting(8, PRECISION, "with --use_mixed_precision: word length of "
                                                "activations and errors", within="[2, 16]")
    grad_quantization_bits: int = setting(8, PRECISION, "with --use_mixed_precision: word length of the gradients",
                                          within="[2, 16]")
    moving_average: bool = setting(False, CORE, "keep the server moving average and serve it (the paper's paradigm)")
    moving_weight: float = setting(0.9, CORE, "lambda of the moving average", within="[0, 1)")
    ma_start: int = setting(1, CORE, "first round entering the moving average", within="[1, inf)")
    aggregation_mode: str = setting(
        "fedavg", ALGORITHMS, "FL algorithm: fedavg, fedprox, fedbn (batch norm stays local), abavg (accuracy-"
        "weighted), fedgen (server feature generator), fedftg or fedtgp (server data-free fine-tuning)",
        choices=AGGREGATION_MODES, aliases=MODE_ALIASES)
    aggregation_weighting: str = setting("uniform", ALGORITHMS, "uniform (published code) or samples (weighted by "
                                         "client data size)", choices=WEIGHTINGS)
    client_state: str = setting("auto", PERFORMANCE, "client optimizer state: auto, memory, disk (spilled under "
                                "--out), none (fresh each round)", choices=CLIENT_STATES, resumable=True)
    compile: str = setting("auto", PERFORMANCE, "torch.compile the low-precision training step and evaluation: auto "
                           "(where a process's work repays the compile: on CUDA, and for long runs on a CPU; "
                           "docs/compile.md), on, off", choices=COMPILE_MODES,
                           resumable=True)
    compile_mode: str = setting("default", PERFORMANCE, "torch.compile mode: default, reduce-overhead (CUDA graphs: "
                                "fewer launches per step), max-autotune, max-autotune-no-cudagraphs",
                                choices=TORCH_COMPILE_MODES, resumable=True)
    cohort: str = setting("auto", PERFORMANCE, "train a round's clients together as one batched model (vmap): auto "
                          "(on with CUDA), on, off; configurations that cannot be batched (batch norm, FedGen, SGD) "
                          "train one client at a time", choices=COHORT_MODES, resumable=True, drivers=("sim",))
    cohort_size: int = setting(0, PERFORMANCE, "clients per batched step (0: as many of a round's clients as fit "
                               "in memory: all, halved whenever a step runs out of memory)", within="[0, inf)", resumable=True, drivers=("sim",))
    workers: int = setting(0, PERFORMANCE, "processes that train each round's clients and score the served model "
                           "(torch.distributed; the results do not depend on it): 0 = auto (on a CPU one per 4 cores, "
                           "at most one per client of a round, for runs long enough to repay starting them; 1 on "
                           "CUDA); under torchrun the launcher's ranks", within="[0, inf)", resumable=True,
                           drivers=("sim",))
    compute: str = setting("auto", PRECISION, "auto, bf16 (exact bf16 products on a <=8-bit grid), fp32",
                           choices=COMPUTE_MODES)
    eval_precision: str = setting(
        "paper", PRECISION, "which of the served model's two scores (both kept: test_accuracy_fp32_act, "
        "test_accuracy_policy_act) is test_accuracy: paper (the published code's: fp32 activations with "
        "--moving_average, the run's activation format without), policy (the run's format) or full (fp32 "
        "activations); see docs/evaluation.md", choices=EVAL_PRECISIONS, before="policy")
    eval_every: int = setting(1, OUTPUT, "score the served model every N rounds (and always in the last 5 rounds, "
                              "the summary's window); the other rounds' test metrics are null", within="[1, inf)",
                              resumable=True)
    log: str = setting("none", OUTPUT, "also send each round's metrics, the config and the curves to an experiment "
                       "tracker: tensorboard (event files in OUT/tensorboard; pip install 'lptfl[tensorboard]') or "
                       "wandb (project lptfl; WANDB_MODE=offline keeps it local; pip install 'lptfl[wandb]')",
                       choices=TRACKERS, resumable=True, drivers=("sim",))
    device: str = setting("cpu", PERFORMANCE, "cpu or cuda", resumable=True)
    compress: bool = setting(False, PERFORMANCE, "zstd on the payloads (lossless)")
    checkpoint_every: int = setting(1, RELIABILITY, "write a crash-safe checkpoint every N rounds (and after the "
                                    "last); 0: none", within="[0, inf)", resumable=True)
    dropout: float = added(0.0, RELIABILITY, "probability that a sampled client fails to reply (reproducible per "
                           "seed, round, client)", within="[0, 1)", drivers=("sim",))
    min_clients: int = added(1, RELIABILITY, "skip a round (models unchanged, metrics skipped: true) with fewer "
                             "accepted updates", within="[1, inf)")
    max_update_norm: float = added(0.0, RELIABILITY, "reject an update farther than this (L2) from the served "
                                   "model; 0: no limit", within="[0, inf)")
    robust: str = added("none", RELIABILITY, "none (running mean), median or trimmed_mean (coordinate-wise)",
                        choices=ROBUST_MODES)
    trim_fraction: float = added(0.1, RELIABILITY, "fraction trimmed at each end by --robust trimmed_mean, in "
                                 "[0, 0.5)", within="[0, 0.5)")
    model_norm: str = added("", ALGORITHMS, "ConvNet normalisation: instancenorm, groupnorm, batchnorm, layernorm, "
                            "none (empty: default)", choices=MODEL_NORMS)
    lambda_fedprox: float = added(0.01, ALGORITHMS, "FedProx mu: local loss + mu * ||w - w_global||^2",
                                  within="[0, inf)")
    abavg_val_fraction: float = added(0.05, ALGORITHMS, "ABAvg: fraction of the training set held out as server "
                                      "validation data", within="(0, 1)")
    abavg_use_test_set: bool = added(False, ALGORITHMS, "ABAvg: weight clients by test-set accuracy (the published "
                                     "code) instead")
    server_optimizer: str = added("none", ALGORITHMS, "none, fedavgm, fedadam, fedyogi: server step on the "
                                  "pseudo-gradient served - mean", choices=SERVER_OPTIMIZERS)
    server_lr: float = added(0.0, ALGORITHMS, "server learning rate (0: 1 for fedavgm, 0.1 fedadam, 0.01 fedyogi)",
                             within="[0, inf)")
    server_momentum: float = added(0.9, ALGORITHMS, "fedavgm momentum", within="[0, 1)")
    server_beta1: float = added(0.9, ALGORITHMS, "fedadam/fedyogi first-moment decay", within="[0, 1)")
    server_beta2: float = added(0.99, ALGORITHMS, "fedadam/fedyogi second-moment decay", within="[0, 1)")
    server_tau: float = added(0.0, ALGORITHMS, "fedadam/fedyogi adaptivity (0: 1e-9 fedadam, 1e-3 fedyogi)",
                              within="[0, inf)")
    fedgen_alpha: float = added(FedGenConfig.alpha, ALGORITHMS, "FedGen: initial weight of the generated-label "
                                "cross-entropy", within="[0, inf)", published="generative_alpha")
    fedgen_beta: float = added(FedGenConfig.beta, ALGORITHMS, "FedGen: initial weight of the KL to the generated "
                               "features' predictions", within="[0, inf)", published="generative_beta")
    fedgen_decay: float = added(FedGenConfig.decay, ALGORITHMS, "FedGen: per-round decay of both weights",
                                within="(0, 1]", published="coef_decay")
    fedgen_lr: float = added(FedGenConfig.lr, ALGORITHMS, "FedGen: generator (ensemble) learning rate",
                             within="(0, inf)", published="ensemble_lr")
    fedgen_batch_size: int = added(FedGenConfig.batch_size, ALGORITHMS, "FedGen: generated samples per step",
                                   within="[2, inf)", published="gen_batch_size")
    fedgen_noise_dim: int = added(FedGenConfig.noise_dim, ALGORITHMS, "FedGen: noise size", within="[2, inf)",
                                  published="noise_dim")
    fedgen_hidden: int = added(FedGenConfig.hidden, ALGORITHMS, "FedGen: generator hidden width", within="[2, inf)",
                               published="hidden_dim")
    fedgen_steps: int = added(FedGenConfig.steps, ALGORITHMS, "FedGen: generator steps per round", within="[0, inf)",
                              published="train_generator_epoch")
    fedgen_diversity: float = added(FedGenConfig.diversity, ALGORITHMS, "FedGen: weight of the generator's "
                                    "diversity loss", within="[0, inf)", published="ensemble_eta")
    fedftg_gen_lr: float = added(FedFTGConfig.gen_lr, ALGORITHMS, "FedFTG: generator learning rate (cosine over a "
                                 "round's iterations)", within="(0, inf)", published="g_lr")
    fedftg_lr: float = added(FedFTGConfig.lr, ALGORITHMS, "FedFTG: server fine-tuning learning rate (cosine)",
                             within="(0, inf)", published="s_lr")
    fedftg_iterations: int = added(FedFTGConfig.iterations, ALGORITHMS, "FedFTG: fine-tuning iterations per round",
                                   within="[0, inf)", published="tgp_iteration")
    fedftg_gen_rounds: int = added(FedFTGConfig.gen_rounds, ALGORITHMS, "FedFTG: generator steps per iteration",
                                   within="[0, inf)", published="inner_round_g")
    fedftg_distill_rounds: int = added(FedFTGConfig.distill_rounds, ALGORITHMS, "FedFTG: distillation steps per "
                                       "iteration", within="[0, inf)", published="inner_round_d")
    fedftg_batch_size: int = added(FedFTGConfig.batch_size, ALGORITHMS, "FedFTG: generated images per step",
                                   within="[2, inf)")
    fedftg_noise_dim: int = added(FedFTGConfig.noise_dim, ALGORITHMS, "FedFTG: noise size", within="[2, inf)")
    fedftg_hard_weight: float = added(FedFTGConfig.hard_weight, ALGORITHMS, "FedFTG: weight of the student-teacher "
                                      "discrepancy the generator maximises", within="[0, inf)")
    fedftg_diversity: float = added(FedFTGConfig.diversity, ALGORITHMS, "FedFTG: weight of the generator's "
                                    "diversity loss", within="[0, inf)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "aliases" in f.metadata and isinstance(value, str):
                setattr(self, f.name, _canonical_choice(f, value))

    def fedgen_config(self) -> FedGenConfig:
        """FedGen's settings from the ``--fedgen_*`` flags."""
        return FedGenConfig(**{k: getattr(self, f"fedgen_{k}") for k in FedGenConfig().__dict__})

    def fedftg_config(self) -> FedFTGConfig:
        """FedFTG's settings from the ``--fedftg_*`` flags."""
        return FedFTGConfig(**{k: getattr(self, f"fedftg_{k}") for k in FedFTGConfig().__dict__})

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting of the wrong type or out of range,
        and what was expected."""
        for f in fields(self):
            value = checked_value(f.name, field_kind(f), getattr(self, f.name))
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                names = ", ".join(json.dumps(c) for c in (*f.metadata["choices"], *f.metadata.get("aliases", ())))
                raise ConfigError(f.name, f"one of {names}", value)
            if "within" in f.metadata and not _within(value, f.metadata["within"]):
                raise ConfigError(f.name, _interval_words(field_kind(f), f.metadata["within"]), value)
        try:
            canonical_name(self.dataset)
        except ValueError:
            raise ConfigError("dataset", f"one of {', '.join(DATASET_NAMES)}", self.dataset) from None
        if self.model_name.lower() not in {m.lower() for m in MODELS}:
            raise ConfigError("model_name", f"one of {', '.join(MODELS)}", self.model_name)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError("device", "cpu, cuda or cuda:N", self.device)
        sampled = self.clients_per_round()
        if self.min_clients > sampled:
            raise ConfigError("min_clients", f"at most the {sampled} clients sampled a round (--frac {self.frac:g} of "
                                             f"--num_clients {self.num_clients}), or every round is skipped",
                              self.min_clients)
        if self.aggregation_mode == "abavg" and self.robust != "none":
            raise ConfigError("robust", "none with --aggregation_mode abavg (it weights the mean)", self.robust)

    def clients_per_round(self) -> int:
        """Clients sampled each round (:func:`clients_per_round`)."""
        return clients_per_round(self.num_clients, self.frac)

    def unused_settings(self) -> list[str]:
        """The settings given another value than their default that the other settings leave unused,
        each as ``"--name (why)"``, so that a run can say so rather than ignore them silently."""
        model = self.model_name.lower()
        rules = (
            (("quantization_bits", "use_mixed_precision", "block_dim", "small_block", "quant_type", "downlink",
              "compute"), not self.use_quantization, "the run is fp32 without --use_quantization"),
            (("compute",), self.use_quantization and not self.use_mixed_precision and self.quantization_bits > 8,
             "exact bf16 products need operands of at most 8 bits"),
            (("weight_quantization_bits", "activation_quantization_bits", "grad_quantization_bits"),
             not (self.use_quantization and self.use_mixed_precision), "used only with --use_mixed_precision"),
            (("moving_weight", "ma_start"), not self.moving_average, "used only with --moving_average"),
            (("ma_start",), self.moving_average and self.ma_start > self.c_rounds,
             f"the average starts after the last round, {self.c_rounds}"),
            (("server_lr",), self.server_optimizer == "none", "used only with a --server_optimizer"),
            (("lambda_fedprox",), self.aggregation_mode != "fedprox", "used only with --aggregation_mode fedprox"),
            (("model_norm",), model != "convnet", "only the ConvNet takes a norm"),
            (("model_width",), model not in ("convnet", "mlp"), f"{self.model_name} has its own widths"),
        )
        defaults = {f.name: f.default for f in fields(self)}
        return [f"--{name} ({why})" for names, unused, why in rules if unused
                for name in names if getattr(self, name) != defaults[name]]

    def warn_unused(self) -> None:
        """Log a warning for each of :meth:`unused_settings` (at the start of a run)."""
        for unused in self.unused_settings():
            log.warning("%s has no effect in this run", unused)

    def policy(self) -> PrecisionPolicy:
        """The precision policy these flags describe."""
        if not self.use_quantization:
            return PrecisionPolicy.full_precision()
        mixed = self.use_mixed_precision
        return PrecisionPolicy.low_precision(
            self.quantization_bits,
            weight_bits=self.weight_quantization_bits if mixed else None,
            activation_bits=self.activation_quantization_bits if mixed else None,
            grad_bits=self.grad_quantization_bits if mixed else None,
            layout=self.block_dim,
            small_block=self.small_block,
            rounding=self.quant_type,
            downlink=self.downlink,
            compute=self.compute,
        )

    def scored_activations(self) -> str:
        """Which score of the served model ``test_accuracy`` is: ``"fp32_act"`` or ``"policy_act"``."""
        return scored_activations(self.eval_precision, self.moving_average)

    def eval_policy(self) -> PrecisionPolicy:
        """The precision of the model that scores ``test_accuracy``: fp32 for ``"fp32_act"``, else the run's."""
        return PrecisionPolicy.full_precision() if self.scored_activations() == "fp32_act" else self.policy()

    def server_config(self) -> ServerConfig:
        """The server's aggregation settings under these flags (simulator and Flower alike)."""
        policy = self.policy()
        return ServerConfig(
            moving_average=self.moving_average, moving_weight=self.moving_weight,
            ma_start=self.ma_start, weighting=self.aggregation_weighting,
            downlink=policy.downlink, uplink=policy.uplink, seed=self.seed,
            min_clients=self.min_clients, max_update_norm=self.max_update_norm or None,
            robust=self.robust, trim_fraction=self.trim_fraction,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """A hash of every setting that changes results (see :func:`setting`'s ``before`` and
        ``resumable``; not of ``c_rounds`` under a constant learning rate, so a finished run can be extended)."""
        items = {
            f.name: getattr(self, f.name) for f in fields(self)
            if not f.metadata.get("resumable") and getattr(self, f.name) != f.metadata.get("before", _NEVER)
        }
        if self.lr_schedule == "none":
            del items["c_rounds"]
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def resumable() -> tuple[str, ...]:
        """The settings a resume may change (besides ``c_rounds`` under a constant learning rate)."""
        return tuple(f.name for f in fields(RunConfig) if f.metadata.get("resumable"))

    @classmethod
    def from_dict(cls, values: dict, *, source: str | None = None) -> RunConfig:
        """Build from a mapping of flag names (a config file, a saved ``config.json``).

        Args:
            values: setting name -> value; a value must have the field's type (see :func:`checked_value`).
            source: where the values come from (a file name), for the messages; None: flags.

        Raises:
            ValueError: a key that names no setting (the nearest name suggested).
            ConfigError: a value of another type.
        """
        return cls(**typed_values(values, source))


# What a saved config (config.json, summary.json) written before a setting existed had in effect,
# where that differs from today's default: read such a file with these values underneath.
SAVED_DEFAULTS = {f.name: f.metadata["before"] for f in fields(RunConfig)
                  if f.metadata.get("before", f.default) != f.default}


def typed_values(values: dict, source: str | None = None) -> dict:
    """``values`` (setting name -> value) checked against the fields' types (:func:`checked_value`).

    Raises:
        ValueError: a key that names no setting (the nearest name suggested).
        ConfigError: a value of another type, said of ``source`` (a file; None: flags).
    """
    known = {f.name: f for f in fields(RunConfig)}
    for key in values:
        if key not in known:
            raise unknown_key(key, known, source)
    return {key: checked_value(key, field_kind(known[key]), value, source) for key, value in values.items()}


def load_config_file(path: str | Path) -> dict:
    """The settings of a TOML file, or of a JSON file (``*.json``: the published entry point's format,
    an object of flag names), in our names (:func:`from_published`) and checked (:func:`typed_values`).

    Raises:
        ValueError: the file is missing, unreadable or malformed, or holds an unknown key.
        ConfigError: a value of the wrong type.
    """
    path = Path(path)
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"{path}: the config file {what}; give --config a .toml or .json file")
    try:
        data = path.read_bytes()
        raw = json.loads(data) if kind == "JSON" else tomllib.loads(data.decode("utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the config file ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError, TOMLDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid {kind} ({err}); a JSON config's name must end in .json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of flag names and values, got {shown(raw)[:40]}")
    return typed_values(from_published(raw, str(path)), str(path))


def _canonical_choice(f: Field, value: str) -> str:
    """The choice that ``value`` names, by its own name or an alias, in any case (``Adam``: ``adam``);
    ``value`` itself when it names none (``validate`` refuses it)."""
    names = {c.lower(): c for c in f.metadata["choices"]}
    names.update({alias.lower(): c for alias, c in f.metadata["aliases"].items()})
    return names.get(value.lower(), value)


def published_names() -> dict[str, str]:
    """The published entry point's flag names that differ from ours: published name -> field name."""
    return {f.metadata["published"]: f.name for f in fields(RunConfig) if "published" in f.metadata}


def from_published(values: dict, source: str | None = None) -> dict:
    """``values`` with the published entry point's names (``ensemble_lr``, ``g_lr`` ...) and its
    JSON config format (nested objects, nulls for flags not given) turned into ours.

    The published flags that change nothing here (:data:`PUBLISHED_NO_OPS`) are dropped, with a
    logged note where the value differs from the published default; so are the keys its script
    adds to a saved config (:data:`PUBLISHED_DERIVED`).
    """
    renames = published_names()
    ours: dict = {}
    for key, value in _flat(values, source).items():
        if key in PUBLISHED_NO_OPS or key in PUBLISHED_DERIVED:
            _, default, why = PUBLISHED_NO_OPS.get(key, (None, value, ""))
            if value != default:
                log.warning("%s%s has no effect here: %s", f"{source}: " if source else "--", key, why)
            continue
        name = renames.get(key, key)
        ours[name] = _PUBLISHED_NULLS.get(name, value) if value is None else value
    return ours


def clients_per_round(num_clients: int, frac: float) -> int:
    """Clients sampled each round out of ``num_clients``: ``max(1, round(frac * num_clients))``."""
    return max(1, int(round(frac * num_clients)))


def _flat(values: dict, source: str | None = None) -> dict:
    """Nested objects merged into one level, as the published script reads its JSON configs.

    Raises:
        ConfigError: a key given twice with different values (in two tables or objects).
    """
    flat: dict = {}
    for key, value in values.items():
        for name, item in (_flat(value, source) if isinstance(value, dict) else {key: value}).items():
            if name in flat and flat[name] != item:
                raise ConfigError(name, f"one value (it is given twice: {shown(flat[name])} and {shown(item)})", item,
                                  source)
            flat[name] = item
    return flat
