"""The configuration of one federated run, with the published entry point's flag names.

Each setting is declared once, as a field of :class:`RunConfig` with its checks (:func:`setting`):
its type (the annotation), an interval or a list of choices, and the published entry point's name
where that differs. Every value that comes from outside (a TOML or JSON file, a run's saved
``config.json``, a Flower run config) passes :meth:`RunConfig.from_dict`, which refuses unknown keys
and values of another type (nothing is converted but an integer where a number belongs);
:meth:`RunConfig.validate` checks the ranges. Both raise :class:`ConfigError`, which names the key,
what was expected and the value given.
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
from lptfl.fl.server import WEIGHTINGS, ServerConfig
from lptfl.models import MODELS
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
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
ROBUST_MODES = ("none", "median", "trimmed_mean")
MODEL_NORMS = ("", "instancenorm", "groupnorm", "batchnorm", "layernorm", "none")
# Which of the served model's two test scores (fp32 activations, the run's activation format; both
# are kept every evaluated round) is `test_accuracy` / `test_loss`: "paper" (the published code's
# protocol: fp32 activations with the moving average, the run's format without it), "policy" (the
# run's format always; what every run before both scores were kept recorded) or "full" (fp32 always)
EVAL_PRECISIONS = ("paper", "policy", "full")
# What a saved config (config.json, summary.json) written before a setting existed had in effect,
# where that differs from today's default: read such a file with these values underneath.
SAVED_DEFAULTS = {"eval_precision": "policy"}
# settings added after results were published: left out of the fingerprint at their default,
# so the fingerprints of older runs stay valid (eval_precision: "policy" was the default before "paper")
_FINGERPRINT_IF_SET = {"dropout": 0.0, "min_clients": 1, "max_update_norm": 0.0, "robust": "none", "trim_fraction": 0.1,
                       "eval_precision": "policy", "downlink": "nearest"}
_FINGERPRINT_IF_SET.update({  # FL algorithms (lptfl.fl.algorithms, lptfl.fl.server_optim)
    "model_norm": "", "lambda_fedprox": 0.01, "abavg_val_fraction": 0.05, "abavg_use_test_set": False,
    "server_optimizer": "none", "server_lr": 0.0, "server_momentum": 0.9, "server_beta1": 0.9,
    "server_beta2": 0.99, "server_tau": 0.0,
})
_FINGERPRINT_IF_SET.update({f"fedgen_{k}": v for k, v in FedGenConfig().__dict__.items()})
_FINGERPRINT_IF_SET.update({f"fedftg_{k}": v for k, v in FedFTGConfig().__dict__.items()})

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


def unknown_key(key: str, names: Iterable[str], source: str | None) -> ValueError:
    """The error for a key that names no setting, suggesting the nearest name."""
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


def setting(default: Any, *, within: str | None = None, choices: tuple[str, ...] | None = None,
            aliases: dict[str, str] | None = None, published: str | None = None) -> Any:
    """A :class:`RunConfig` field with its checks.

    Args:
        default: the value when none is given.
        within: the interval a number must lie in, e.g. ``"(0, 1]"`` or ``"[1, inf)"``.
        choices: the values a string may take.
        aliases: other names of choices (the published code's spellings); with them the choices
            are matched regardless of case.
        published: the published entry point's name of this flag, where it differs.
    """
    metadata = {"within": within, "choices": choices, "aliases": aliases, "published": published}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


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

    dataset: str = "digits"
    data_path: str = "./data"
    download: bool = False
    no_verify: bool = setting(False)
    alpha: float = setting(0.5, within="(0, inf)")
    partition: str = setting("dirichlet", choices=PARTITIONS)
    model_name: str = "ConvNet"
    model_width: int = setting(0, within="[0, inf)")
    c_rounds: int = setting(12, within="[1, inf)")
    num_clients: int = setting(10, within="[1, inf)")
    frac: float = setting(0.5, within="(0, 1]")
    epochs: int = setting(1, within="[1, inf)")
    batch_size: int = setting(32, within="[1, inf)")
    test_batch_size: int = setting(1000, within="[1, inf)")
    lr: float = setting(1e-3, within="(0, inf)")
    lr_schedule: str = setting("none", choices=LR_SCHEDULES, aliases={"CosineAnnealingLR": "cosine"})
    optimizer: str = setting("adam", choices=OPTIMIZERS, aliases={})
    seed: int = 0
    use_quantization: bool = False
    quantization_bits: int = setting(8, within="[2, 16]")
    block_dim: str = setting("BC", choices=LAYOUTS)
    small_block: str = setting("FC", choices=SMALL_BLOCKS)
    quant_type: str = setting("stochastic", choices=ROUNDINGS)
    downlink: str = setting("nearest", choices=DOWNLINK_MODES)
    use_mixed_precision: bool = False
    weight_quantization_bits: int = setting(8, within="[2, 16]")
    activation_quantization_bits: int = setting(8, within="[2, 16]")
    grad_quantization_bits: int = setting(8, within="[2, 16]")
    moving_average: bool = False
    moving_weight: float = setting(0.9, within="[0, 1)")
    ma_start: int = setting(1, within="[1, inf)")
    aggregation_mode: str = setting("fedavg", choices=AGGREGATION_MODES, aliases=MODE_ALIASES)
    aggregation_weighting: str = setting("uniform", choices=WEIGHTINGS)
    client_state: str = setting("auto", choices=CLIENT_STATES)
    compile: str = setting("auto", choices=COMPILE_MODES)
    compile_mode: str = setting("default", choices=TORCH_COMPILE_MODES)
    cohort: str = setting("auto", choices=COHORT_MODES)
    cohort_size: int = setting(0, within="[0, inf)")
    compute: str = setting("auto", choices=COMPUTE_MODES)
    eval_precision: str = setting("paper", choices=EVAL_PRECISIONS)
    eval_every: int = setting(1, within="[1, inf)")
    log: str = setting("none", choices=TRACKERS)
    device: str = "cpu"
    compress: bool = False
    checkpoint_every: int = setting(1, within="[0, inf)")
    dropout: float = setting(0.0, within="[0, 1)")
    min_clients: int = setting(1, within="[1, inf)")
    max_update_norm: float = setting(0.0, within="[0, inf)")
    robust: str = setting("none", choices=ROBUST_MODES)
    trim_fraction: float = setting(0.1, within="[0, 0.5)")
    model_norm: str = setting("", choices=MODEL_NORMS)
    lambda_fedprox: float = setting(0.01, within="[0, inf)")
    abavg_val_fraction: float = setting(0.05, within="(0, 1)")
    abavg_use_test_set: bool = False
    server_optimizer: str = setting("none", choices=SERVER_OPTIMIZERS)
    server_lr: float = setting(0.0, within="[0, inf)")
    server_momentum: float = setting(0.9, within="[0, 1)")
    server_beta1: float = setting(0.9, within="[0, 1)")
    server_beta2: float = setting(0.99, within="[0, 1)")
    server_tau: float = setting(0.0, within="[0, inf)")
    fedgen_alpha: float = setting(FedGenConfig.alpha, within="[0, inf)", published="generative_alpha")
    fedgen_beta: float = setting(FedGenConfig.beta, within="[0, inf)", published="generative_beta")
    fedgen_decay: float = setting(FedGenConfig.decay, within="(0, 1]", published="coef_decay")
    fedgen_lr: float = setting(FedGenConfig.lr, within="(0, inf)", published="ensemble_lr")
    fedgen_batch_size: int = setting(FedGenConfig.batch_size, within="[2, inf)", published="gen_batch_size")
    fedgen_noise_dim: int = setting(FedGenConfig.noise_dim, within="[2, inf)", published="noise_dim")
    fedgen_hidden: int = setting(FedGenConfig.hidden, within="[2, inf)", published="hidden_dim")
    fedgen_steps: int = setting(FedGenConfig.steps, within="[0, inf)", published="train_generator_epoch")
    fedgen_diversity: float = setting(FedGenConfig.diversity, within="[0, inf)", published="ensemble_eta")
    fedftg_gen_lr: float = setting(FedFTGConfig.gen_lr, within="(0, inf)", published="g_lr")
    fedftg_lr: float = setting(FedFTGConfig.lr, within="(0, inf)", published="s_lr")
    fedftg_iterations: int = setting(FedFTGConfig.iterations, within="[0, inf)", published="tgp_iteration")
    fedftg_gen_rounds: int = setting(FedFTGConfig.gen_rounds, within="[0, inf)", published="inner_round_g")
    fedftg_distill_rounds: int = setting(FedFTGConfig.distill_rounds, within="[0, inf)", published="inner_round_d")
    fedftg_batch_size: int = setting(FedFTGConfig.batch_size, within="[2, inf)")
    fedftg_noise_dim: int = setting(FedFTGConfig.noise_dim, within="[2, inf)")
    fedftg_hard_weight: float = setting(FedFTGConfig.hard_weight, within="[0, inf)")
    fedftg_diversity: float = setting(FedFTGConfig.diversity, within="[0, inf)")

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
        if self.aggregation_mode == "abavg" and self.robust != "none":
            raise ConfigError("robust", "none with --aggregation_mode abavg (it weights the mean)", self.robust)

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
        """A hash of every setting that changes results (not of device, compile or paths; not of
        ``c_rounds`` under a constant learning rate, so a finished run can be extended)."""
        ignored = {"device", "compile", "compile_mode", "data_path", "download", "no_verify", "client_state", "checkpoint_every",
                   "eval_every", "cohort", "cohort_size", "log"}
        if self.lr_schedule == "none":
            ignored.add("c_rounds")
        items = {
            k: v for k, v in self.to_dict().items()
            if k not in ignored and not (k in _FINGERPRINT_IF_SET and v == _FINGERPRINT_IF_SET[k])
        }
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]

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
    for key, value in _flat(values).items():
        if key in PUBLISHED_NO_OPS or key in PUBLISHED_DERIVED:
            _, default, why = PUBLISHED_NO_OPS.get(key, (None, value, ""))
            if value != default:
                log.warning("%s%s has no effect here: %s", f"{source}: " if source else "--", key, why)
            continue
        name = renames.get(key, key)
        ours[name] = _PUBLISHED_NULLS.get(name, value) if value is None else value
    return ours


def _flat(values: dict) -> dict:
    """Nested objects merged into one level, as the published script reads its JSON configs."""
    flat: dict = {}
    for key, value in values.items():
        flat.update(_flat(value) if isinstance(value, dict) else {key: value})
    return flat
