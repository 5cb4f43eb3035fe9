"""`lptfl --help` (issue 35, point 9): flags in groups, help for every flag with its choices shown,
and a typo'd flag answered with the nearest name."""

import argparse
from dataclasses import fields

import pytest

from lptfl.cli import build_parser, main
from lptfl.experiment.config import PUBLISHED_NO_OPS, RunConfig

GROUPS = ["the paper's core flags", "precision", "algorithms", "reliability", "output", "performance",
          "the published entry point's flags without effect here"]


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def flags_by_group(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    return {group.title: group._group_actions for group in parser._action_groups}


def test_each_command_shows_the_settings_of_its_driver_in_their_groups():
    for command, driver, skipped in [("run", "sim", set()), ("flower-local", "flower", {"num_clients"})]:
        groups = flags_by_group(subparser(command))
        shown = {a.dest: title for title, actions in groups.items() for a in actions}
        expected = {f.name: f.metadata["group"] for f in fields(RunConfig) if driver in f.metadata["drivers"]}
        assert {k: v for k, v in shown.items() if k in RunConfig.__dataclass_fields__} == {
            k: v for k, v in expected.items() if k not in skipped}, command
    assert {"dropout", "log", "cohort"} <= set(RunConfig.__dataclass_fields__) - {
        a.dest for a in subparser("flower-local")._actions}


@pytest.mark.parametrize("command", ["run", "flower-local"])
def test_help_lists_the_groups_in_order_with_help_for_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)
    groups = flags_by_group(subparser(command))
    for title in GROUPS:
        assert groups[title], title
    for action in subparser(command)._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_a_choice_setting_shows_its_choices_and_a_flag_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--robust {none,median,trimmed_mean}" in text and "(default none)" in text
    assert "--optimizer {adam,sgd,sgd-momentum}" in text and "--quant_type {stochastic,nearest}" in text
    groups = flags_by_group(subparser("run"))
    assert {"--resume", "--stop_after", "--no_verify"} <= {s for a in groups["reliability"] for s in a.option_strings}
    assert {"--compile", "--device"} <= {s for a in groups["performance"] for s in a.option_strings}
    assert {f"--{name}" for name in PUBLISHED_NO_OPS} <= {
        s for a in groups["the published entry point's flags without effect here"] for s in a.option_strings}


@pytest.mark.parametrize("argv, suggestion", [
    (["run", "--quantizaton_bits", "4"], "did you mean --quantization_bits?"),
    (["run", "--no-use_quantizaton"], "did you mean --no-use_quantization?"),
    (["--movng_average"], "did you mean --moving_average?"),
    (["flower-local", "--out", "o", "--supernodse", "3"], "did you mean --supernodes?"),  # refused in parsing
    (["report", "r", "--plt", "x.png"], "did you mean --plot?"),
])
def test_a_typo_in_a_flag_suggests_the_nearest_name(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and suggestion in err, err
