"""Settings declared once (issue 32, point 2): every RunConfig field carries its metadata, and the
fingerprint and the resume whitelist derived from it keep the meaning they had."""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from lptfl.experiment.config import DRIVERS, GROUPS, SAVED_DEFAULTS, RunConfig, field_kind
from lptfl.experiment.checkpoint import CheckpointError, resume_config

# fingerprints computed with the hand-written lists that the metadata replaced: they must not move
FIXED = [
    ({}, "52e04145cdf137a4"),
    ({"dataset": "cifar10", "model_name": "resnet8", "use_quantization": True, "quantization_bits": 6,
      "moving_average": True, "moving_weight": 0.5, "c_rounds": 100, "num_clients": 50, "frac": 0.2, "seed": 3},
     "3f9bf83aaab94f55"),
    ({"aggregation_mode": "fedgen", "fedgen_alpha": 0.3, "fedgen_steps": 2, "lr_schedule": "cosine", "c_rounds": 40},
     "6213652bb2135655"),
    ({"aggregation_mode": "fedftg", "fedftg_iterations": 3, "server_optimizer": "fedadam", "server_lr": 0.1,
      "robust": "trimmed_mean", "trim_fraction": 0.2, "dropout": 0.1, "min_clients": 2, "max_update_norm": 5.0},
     "deb51672e6663037"),
    ({"eval_precision": "policy", "downlink": "stochastic", "model_norm": "groupnorm", "lambda_fedprox": 0.1,
      "aggregation_mode": "fedprox", "use_mixed_precision": True, "use_quantization": True,
      "grad_quantization_bits": 6, "compile": "on", "device": "cuda", "eval_every": 5, "cohort": "on",
      "client_state": "disk", "log": "wandb"}, "2687e3df1a9ff5ab"),
]


@pytest.mark.parametrize("values, expected", FIXED)
def test_the_fingerprints_of_existing_configs_are_unchanged(values, expected):
    assert RunConfig(**values).fingerprint() == expected


def other_value(f, current):
    """A valid value of field ``f`` other than ``current`` (its default, or lr_schedule's "cosine")."""
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != current)
    strings = {"dataset": "mnist", "data_path": "./elsewhere", "model_name": "MLP", "device": "cuda"}
    kind = field_kind(f)
    return {"bool": not f.default, "int": f.default + 1, "float": f.default / 2 or 0.01}.get(kind) if kind != "str" \
        else strings[f.name]


def test_every_setting_is_declared_with_its_metadata_and_the_fingerprint_follows_it():
    base = RunConfig(lr_schedule="cosine")  # c_rounds counts too
    for f in fields(RunConfig):
        meta = f.metadata
        assert meta["group"] in GROUPS and meta["help"] and set(meta["drivers"]) <= set(DRIVERS), f.name
        changed = replace(base, **{f.name: other_value(f, getattr(base, f.name))})
        changed.validate()
        assert (changed.fingerprint() == base.fingerprint()) == bool(meta.get("resumable")), f.name
    # a setting fingerprinted only away from its `before` value is pinned by FIXED (its defaults, eval_precision)
    assert SAVED_DEFAULTS == {"eval_precision": "policy"}


def test_a_refused_resume_names_every_setting_it_may_change(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    with pytest.raises(CheckpointError) as refused:
        resume_config(tmp_path, {"seed": 3})
    named = {word.strip(",") for word in str(refused.value).split("(only ")[1].split(" may differ")[0].split()}
    assert named == {f"--{name}" for name in RunConfig.resumable()}
    assert {"--compile", "--device", "--checkpoint_every", "--data_path"} <= named
    fields_ = RunConfig.__dataclass_fields__
    changed = {name: other_value(fields_[name], fields_[name].default) for name in RunConfig.resumable()}
    assert resume_config(tmp_path, changed) == RunConfig(**changed)


def test_reliability_doc_lists_every_setting_a_resume_may_change():
    text = " ".join((Path(__file__).parents[2] / "docs" / "reliability.md").read_text().split())
    listed = text.split("may change only settings outside the config fingerprint (", 1)[1].split(":", 1)[0]
    assert sorted(name.strip("`- ") for name in listed.split(",")) == sorted(RunConfig.resumable())


def test_settings_the_others_leave_unused_are_named():
    assert RunConfig().unused_settings() == []
    assert RunConfig(use_quantization=True, quantization_bits=6, moving_average=True, ma_start=3).unused_settings() == []
    assert RunConfig(quantization_bits=4, server_lr=5.0, ma_start=100).unused_settings() == [
        "--quantization_bits (the run is fp32 without --use_quantization)",
        "--ma_start (used only with --moving_average)",
        "--server_lr (used only with a --server_optimizer)"]
    assert RunConfig(use_quantization=True, weight_quantization_bits=4, model_name="MLP",
                     model_norm="batchnorm").unused_settings() == [
        "--weight_quantization_bits (used only with --use_mixed_precision)",
        "--model_norm (only the ConvNet takes a norm)"]
    assert RunConfig(use_quantization=True, quantization_bits=12, compute="bf16").unused_settings() == [
        "--compute (exact bf16 products need operands of at most 8 bits)"]
    assert RunConfig(use_quantization=True, compute="bf16").unused_settings() == []
    assert RunConfig(moving_average=True, ma_start=13).unused_settings() == [
        "--ma_start (the average starts after the last round, 12)"]
    assert RunConfig(model_name="resnet8", model_width=16).unused_settings() == [
        "--model_width (resnet8 has its own widths)"]
