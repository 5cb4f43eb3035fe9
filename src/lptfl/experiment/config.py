"""The configuration of one federated run, with the published entry point's flag names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

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

PARTITIONS = ("dirichlet", "dirichlet-plain", "iid")
LR_SCHEDULES = ("none", "cosine", "step")
CLIENT_STATES = ("auto", "memory", "disk", "none")
COMPILE_MODES = ("auto", "on", "off")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
ROBUST_MODES = ("none", "median", "trimmed_mean")
# "policy": evaluate with the run's activation format; "full": without activation quantizers
EVAL_PRECISIONS = ("policy", "full")
# settings added after results were published: left out of the fingerprint at their default,
# so the fingerprints of older runs stay valid
_FINGERPRINT_IF_SET = {"dropout": 0.0, "min_clients": 1, "max_update_norm": 0.0, "robust": "none", "trim_fraction": 0.1,
                       "eval_precision": "policy", "downlink": "nearest"}
_FINGERPRINT_IF_SET.update({  # FL algorithms (lptfl.fl.algorithms, lptfl.fl.server_optim)
    "model_norm": "", "lambda_fedprox": 0.01, "abavg_val_fraction": 0.05, "abavg_use_test_set": False,
    "server_optimizer": "none", "server_lr": 0.0, "server_momentum": 0.9, "server_beta1": 0.9,
    "server_beta2": 0.99, "server_tau": 0.0,
})
_FINGERPRINT_IF_SET.update({f"fedgen_{k}": v for k, v in FedGenConfig().__dict__.items()})
_FINGERPRINT_IF_SET.update({f"fedftg_{k}": v for k, v in FedFTGConfig().__dict__.items()})


@dataclass
class RunConfig:
    """Every setting of a run. Field names are the command-line flags (``--c_rounds`` ...)."""

    dataset: str = "digits"
    data_path: str = "./data"
    download: bool = False
    alpha: float = 0.5
    partition: str = "dirichlet"
    model_name: str = "ConvNet"
    model_width: int = 0
    c_rounds: int = 12
    num_clients: int = 10
    frac: float = 0.5
    epochs: int = 1
    batch_size: int = 32
    test_batch_size: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "none"
    optimizer: str = "adam"
    seed: int = 0
    use_quantization: bool = False
    quantization_bits: int = 8
    block_dim: str = "BC"
    small_block: str = "FC"
    quant_type: str = "stochastic"
    downlink: str = "nearest"
    use_mixed_precision: bool = False
    weight_quantization_bits: int = 8
    activation_quantization_bits: int = 8
    grad_quantization_bits: int = 8
    moving_average: bool = False
    moving_weight: float = 0.9
    ma_start: int = 1
    aggregation_mode: str = "fedavg"
    aggregation_weighting: str = "uniform"
    client_state: str = "auto"
    compile: str = "auto"
    compile_mode: str = "default"
    compute: str = "auto"
    eval_precision: str = "policy"
    device: str = "cpu"
    compress: bool = False
    checkpoint_every: int = 1
    dropout: float = 0.0
    min_clients: int = 1
    max_update_norm: float = 0.0
    robust: str = "none"
    trim_fraction: float = 0.1
    model_norm: str = ""
    lambda_fedprox: float = 0.01
    abavg_val_fraction: float = 0.05
    abavg_use_test_set: bool = False
    server_optimizer: str = "none"
    server_lr: float = 0.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.0
    fedgen_alpha: float = FedGenConfig.alpha
    fedgen_beta: float = FedGenConfig.beta
    fedgen_decay: float = FedGenConfig.decay
    fedgen_lr: float = FedGenConfig.lr
    fedgen_batch_size: int = FedGenConfig.batch_size
    fedgen_noise_dim: int = FedGenConfig.noise_dim
    fedgen_hidden: int = FedGenConfig.hidden
    fedgen_steps: int = FedGenConfig.steps
    fedgen_diversity: float = FedGenConfig.diversity
    fedftg_gen_lr: float = FedFTGConfig.gen_lr
    fedftg_lr: float = FedFTGConfig.lr
    fedftg_iterations: int = FedFTGConfig.iterations
    fedftg_gen_rounds: int = FedFTGConfig.gen_rounds
    fedftg_distill_rounds: int = FedFTGConfig.distill_rounds
    fedftg_batch_size: int = FedFTGConfig.batch_size
    fedftg_noise_dim: int = FedFTGConfig.noise_dim
    fedftg_hard_weight: float = FedFTGConfig.hard_weight
    fedftg_diversity: float = FedFTGConfig.diversity

    def __post_init__(self) -> None:
        self.aggregation_mode = MODE_ALIASES.get(self.aggregation_mode, self.aggregation_mode)

    def fedgen_config(self) -> FedGenConfig:
        """FedGen's settings from the ``--fedgen_*`` flags."""
        return FedGenConfig(**{k: getattr(self, f"fedgen_{k}") for k in FedGenConfig().__dict__})

    def fedftg_config(self) -> FedFTGConfig:
        """FedFTG's settings from the ``--fedftg_*`` flags."""
        return FedFTGConfig(**{k: getattr(self, f"fedftg_{k}") for k in FedFTGConfig().__dict__})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting and what was expected."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        try:
            canonical_name(self.dataset)
        except ValueError:
            need(False, f"--dataset {self.dataset!r} is unknown; expected one of {', '.join(DATASET_NAMES)}")
        need(self.model_name.lower() in {m.lower() for m in MODELS},
             f"--model_name {self.model_name!r} is unknown; expected one of {', '.join(MODELS)}")
        need(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        need(self.partition in PARTITIONS, f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
        need(0 < self.frac <= 1, f"--frac must be in (0, 1], got {self.frac}")
        need(self.num_clients >= 1, f"--num_clients must be >= 1, got {self.num_clients}")
        need(self.c_rounds >= 1, f"--c_rounds must be >= 1, got {self.c_rounds}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1 and self.test_batch_size >= 1,
             f"--batch_size and --test_batch_size must be >= 1, got {self.batch_size}, {self.test_batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.model_width >= 0, f"--model_width must be >= 0 (0: the model's default), got {self.model_width}")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for flag in ("quantization_bits", "weight_quantization_bits", "activation_quantization_bits", "grad_quantization_bits"):
            bits = getattr(self, flag)
            need(2 <= bits <= 16, f"--{flag} must be in [2, 16] (sign included), got {bits}")
        need(self.block_dim in LAYOUTS, f"--block_dim must be one of {LAYOUTS}, got {self.block_dim!r}")
        need(self.small_block in SMALL_BLOCKS, f"--small_block must be one of {SMALL_BLOCKS}, got {self.small_block!r}")
        need(self.quant_type in ROUNDINGS, f"--quant_type must be one of {ROUNDINGS}, got {self.quant_type!r}")
        need(self.downlink in DOWNLINK_MODES, f"--downlink must be one of {DOWNLINK_MODES}, got {self.downlink!r}")
        need(0 <= self.moving_weight < 1, f"--moving_weight must be in [0, 1), got {self.moving_weight}")
        need(self.ma_start >= 1, f"--ma_start must be >= 1, got {self.ma_start}")
        need(self.aggregation_mode in AGGREGATION_MODES,
             f"--aggregation_mode must be one of {AGGREGATION_MODES} (or fedtgp, the published name of fedftg), "
             f"got {self.aggregation_mode!r}")
        need(self.aggregation_weighting in WEIGHTINGS,
             f"--aggregation_weighting must be one of {WEIGHTINGS}, got {self.aggregation_weighting!r}")
        need(self.client_state in CLIENT_STATES, f"--client_state must be one of {CLIENT_STATES}, got {self.client_state!r}")
        need(self.compile in COMPILE_MODES, f"--compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        need(self.compile_mode in TORCH_COMPILE_MODES,
             f"--compile_mode must be one of {TORCH_COMPILE_MODES}, got {self.compile_mode!r}")
        need(self.compute in COMPUTE_MODES, f"--compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        need(self.eval_precision in EVAL_PRECISIONS,
             f"--eval_precision must be one of {EVAL_PRECISIONS}, got {self.eval_precision!r}")
        need(self.checkpoint_every >= 0, f"--checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.min_clients >= 1, f"--min_clients must be >= 1, got {self.min_clients}")
        need(self.max_update_norm >= 0, f"--max_update_norm must be >= 0 (0: no limit), got {self.max_update_norm}")
        need(self.robust in ROBUST_MODES, f"--robust must be one of {ROBUST_MODES}, got {self.robust!r}")
        need(0 <= self.trim_fraction < 0.5, f"--trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        need(self.model_norm in ("", "instancenorm", "groupnorm", "batchnorm", "layernorm", "none"),
             f"--model_norm must be empty (the model's default) or a ConvNet norm, got {self.model_norm!r}")
        need(self.lambda_fedprox >= 0, f"--lambda_fedprox must be >= 0, got {self.lambda_fedprox}")
        need(0 < self.abavg_val_fraction < 1, f"--abavg_val_fraction must be in (0, 1), got {self.abavg_val_fraction}")
        need(self.server_optimizer in SERVER_OPTIMIZERS,
             f"--server_optimizer must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
        need(self.server_lr >= 0, f"--server_lr must be >= 0 (0: the optimizer's default), got {self.server_lr}")
        need(0 <= self.server_momentum < 1, f"--server_momentum must be in [0, 1), got {self.server_momentum}")
        need(0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1,
             f"--server_beta1/--server_beta2 must be in [0, 1), got {self.server_beta1}, {self.server_beta2}")
        need(self.server_tau >= 0, f"--server_tau must be >= 0 (0: the optimizer's default), got {self.server_tau}")
        for name in ("fedgen_alpha", "fedgen_beta", "fedgen_diversity", "fedftg_hard_weight", "fedftg_diversity"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        need(0 < self.fedgen_decay <= 1, f"--fedgen_decay must be in (0, 1], got {self.fedgen_decay}")
        for name in ("fedgen_lr", "fedftg_gen_lr", "fedftg_lr"):
            need(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("fedgen_batch_size", "fedgen_noise_dim", "fedgen_hidden", "fedftg_batch_size", "fedftg_noise_dim"):
            need(getattr(self, name) >= 2, f"--{name} must be >= 2, got {getattr(self, name)}")
        for name in ("fedgen_steps", "fedftg_iterations", "fedftg_gen_rounds", "fedftg_distill_rounds"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        need(self.aggregation_mode != "abavg" or self.robust == "none",
             "--aggregation_mode abavg weights the mean; it cannot be combined with --robust")

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

    def eval_policy(self) -> PrecisionPolicy:
        """The precision of the served model's evaluation: the run's own (``policy``), or fp32
        activations (``full``, as the published code scores its moving-average runs)."""
        return self.policy() if self.eval_precision == "policy" else PrecisionPolicy.full_precision()

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
        ignored = {"device", "compile", "compile_mode", "data_path", "download", "client_state", "checkpoint_every"}
        if self.lr_schedule == "none":
            ignored.add("c_rounds")
        items = {
            k: v for k, v in self.to_dict().items()
            if k not in ignored and not (k in _FINGERPRINT_IF_SET and v == _FINGERPRINT_IF_SET[k])
        }
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a mapping of flag names (e.g. a TOML file); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected flag names such as {sorted(known)[:6]}...")
        return cls(**values)
