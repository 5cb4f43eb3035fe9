"""The command line against a user's mistakes (issue 35): typed config files, one-line errors,
nothing left behind by a failed start, and the published entry point's flags and JSON configs."""

import errno
import hashlib
import json
import struct
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lptfl.cli import build_parser, config_from_args, main
from lptfl.experiment.config import PUBLISHED_NO_OPS, RunConfig, field_kind
from lptfl.experiment import checkpoint as ckpt
from lptfl.sim import runner

TINY = ["--num_clients", "2", "--model_width", "4", "--compile", "off", "--quiet"]

# the published entry point's args.py defaults, as its --config_save_name writes them (json.dump(vars(args)))
PUBLISHED_CONFIG = {
    "config": None, "config_save_name": None, "project_name": "quant FL", "data_path": "/data/", "run_name": None,
    "result_path": None, "acc_path": None, "checkpoint_path": None, "dataset": "fmnist", "ipc": 15,
    "batch_size": 256, "test_batch_size": 256, "optimizer": "Adam", "classes": None, "num_clients": 80, "frac": 0.4,
    "epochs": 1, "c_rounds": 200, "alpha": 0.04, "seed": 4, "model_name": "ConvNet", "aggregation_mode": "fedavg",
    "lr": 0.001, "lr_schedule": None, "use_quantization": False, "quantization_bits": 8, "small_block": "FC",
    "block_dim": "B", "quant_type": "stochastic", "m": 6, "moving_average": False, "moving_weight": 0.0,
    "ma_start": 1, "lambda_fedprox": 0.001, "ensemble_lr": 0.0003, "gen_batch_size": 32, "generative_alpha": 0.1,
    "generative_beta": 2.5, "ensemble_alpha": 1, "ensemble_beta": 0, "ensemble_eta": 0, "noise_dim": 32,
    "hidden_dim": 32, "use_embedding": 0, "coef_decay": 0.98, "coef_decay_epoch": 1, "ensemble_epoch": 50,
    "train_generator_epoch": 5, "min_samples_per_label": 1, "g_lr": 0.01, "s_lr": 0.0001, "tgp_iteration": 10,
    "inner_round_g": 1, "inner_round_d": 5, "test_client": False, "client_id": 0, "global_test": False,
    "use_mixed_precision": False, "weight_quantization_bits": 8, "activation_quantization_bits": 8,
    "grad_quantization_bits": 8, "num_classes": 10, "channel": 1, "imsize": [28, 28],
}


def parsed(*flags: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *flags]))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``lptfl argv`` (argparse's errors exit); stderr must be one line."""
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert err.count("\n") <= 1, err
    return code, err.strip()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def paused_run(tmp_path):
    """A run paused after round 1 of 3, with its checkpoint."""
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--c_rounds", "3", "--stop_after", "1", "--out", str(run_dir)]) == 0
    return run_dir


def rewrite_checkpoint_metadata(run_dir: Path, change, *, reseal: bool = True) -> None:
    """Apply ``change`` to the lptfl metadata in the checkpoint's safetensors header; with ``reseal``,
    recompute its checksum (a writer's bug, not corruption: the range checks must catch it)."""
    path = run_dir / ckpt.CHECKPOINT
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["lptfl"])
    change(meta)
    if reseal:
        meta["checksum"] = ckpt.metadata_checksum(meta)
    header["__metadata__"]["lptfl"] = json.dumps(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


# -- 1. typed configuration ------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('use_quantization = "false"', 'use_quantization: expected true or false, got "false"'),
    ('frac = "0.5"', 'frac: expected a finite number, got "0.5"'),
    ("c_rounds = 2.0", "c_rounds: expected an integer, got 2.0"),
    ("c_rounds = true", "c_rounds: expected an integer, got true"),
    ("frac = 1.5", "frac: expected a number in (0, 1], got 1.5"),
    ("quantization_bits = 1", "quantization_bits: expected an integer in [2, 16], got 1"),
    ('partition = "random"', 'partition: expected one of "dirichlet", "dirichlet-plain", "iid", got "random"'),
    ("lr = nan", "lr: expected a finite number, got NaN"),
    ("c_round = 3", "c_round: unknown setting; did you mean c_rounds?"),
    ("[a]\nseed = 3\n[b]\nseed = 4", "seed: expected one value (it is given twice: 3 and 4), got 4"),
    ('out = "runs/x"', "out: an option of the command, not a setting of the run; give --out on the command line"),
])
def test_a_wrong_toml_value_is_refused_naming_file_and_key(tmp_path, capsys, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    code, err = run_cli(capsys, "run", "--config", str(toml), *TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and err == f"lptfl: error: {toml}: {message}"
    assert not (tmp_path / "o").exists()


def test_a_flag_overriding_a_wrong_file_value_is_what_is_checked(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("frac = 1.5\nc_rounds = 0\n")
    code, err = run_cli(capsys, "run", "--config", str(toml), "--frac", "1.0", "--out", str(tmp_path / "o"))
    assert code == 2 and err == f"lptfl: error: {toml}: c_rounds: expected an integer >= 1, got 0"
    code, err = run_cli(capsys, "run", "--config", str(toml), "--c_rounds", "1", "--frac", "2", "--out", str(tmp_path))
    assert code == 2 and err == "lptfl: error: --frac: expected a number in (0, 1], got 2.0"


@pytest.mark.parametrize("content, message", [
    ('{"use_quantization": "false"}', 'use_quantization: expected true or false, got "false"'),
    ('{"ensemble_lr": "3e-4"}', 'fedgen_lr: expected a finite number, got "3e-4"'),
    ('{"num_clients": 8.5}', "num_clients: expected an integer, got 8.5"),
    ('{"c_rouns": 3}', "c_rouns: unknown setting; did you mean c_rounds?"),
    ("[1, 2]", "expected an object of flag names and values, got [1, 2]"),
    ("{c_rounds: 3}", "not valid JSON"),
])
def test_a_wrong_json_config_is_refused_naming_file_and_key(tmp_path, capsys, content, message):
    path = tmp_path / "published.json"
    path.write_text(content)
    code, err = run_cli(capsys, "run", "--config", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith(f"lptfl: error: {path}: {message}")


@pytest.mark.parametrize("key, value, message", [
    ("frac", "0.5", 'frac: expected a finite number, got "0.5"'),
    ("frac", 2.0, "frac: expected a number in (0, 1], got 2.0"),
    ("use_quantization", 0, "use_quantization: expected true or false, got 0"),
    ("c_rouds", 3, "c_rouds: unknown setting; did you mean c_rounds?"),
])
def test_a_wrong_value_in_a_saved_config_refuses_the_resume(tmp_path, capsys, key, value, message):
    saved = {**RunConfig().to_dict(), key: value}
    (tmp_path / ckpt.CONFIG).write_text(json.dumps(saved))
    before = folder_hashes(tmp_path)
    code, err = run_cli(capsys, "run", "--resume", str(tmp_path))
    assert code == 2 and err == f"lptfl: error: {tmp_path / ckpt.CONFIG}: {message}"
    assert folder_hashes(tmp_path) == before


# -- 2. no traceback for a user's mistake ---------------------------------------------------------


def test_user_mistakes_end_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["run", "--frac", "abc"], "argument --frac: invalid float value: 'abc'"),
        (["run", "--config", str(tmp_path / "missing.toml")], "the config file does not exist"),
        (["run", "--config", str(tmp_path)], "the config file is a directory"),
        (["run", *TINY, "--c_rounds", "1", "--out", str(a_file)], "is a file, not a directory; choose another --out"),
        (["run", *TINY, "--c_rounds", "1", "--out", str(a_file / "run")], "Not a directory; choose another --out"),
        (["run", "--quantizaton_bits", "4"], "did you mean --quantization_bits?"),
        (["-c_rounds", "1"], "-c_rounds: did you mean --c_rounds?"),
        (["run", "--device", "gpu"], 'device: expected cpu, cuda or cuda:N, got "gpu"'),
        (["run", "--resume", str(tmp_path / "none")], "config.json"),
        (["run", *TINY, "--out", ""], "expected a folder path, got an empty string"),
        (["run", *TINY, "--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
        (["run", *TINY, "--num_clients", "3", "--frac", "1.0", "--min_clients", "5"],
         "--min_clients: expected at most the 3 clients sampled a round"),
        (["flower-local", "--out", str(tmp_path / "f"), "--timeout", "-5"], "expected a number of seconds > 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["run", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")], "use --device cpu"))
    for argv, message in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("lptfl: error: ") and "\n" not in err, (argv, err)
        assert message in err, (argv, err)
    assert not (tmp_path / "o").exists() and a_file.read_text() == "x"


def test_checkpoint_metadata_without_a_key_is_one_line(paused_run, capsys):
    rewrite_checkpoint_metadata(paused_run, lambda meta: meta.pop("round"))
    code, err = run_cli(capsys, "run", "--resume", str(paused_run))
    assert code == 2
    assert err == (f"lptfl: error: {paused_run / ckpt.CHECKPOINT}: its metadata is damaged (no 'round' entry); "
                   "restore the file from a copy, or start the run again with --overwrite")


def test_a_second_stop_signal_ends_in_one_line(tmp_path, capsys, monkeypatch):
    def stopped_at_once(config, out_dir):
        raise KeyboardInterrupt  # what the run's handler raises on a second SIGINT/SIGTERM

    monkeypatch.setattr(runner, "Simulation", stopped_at_once)
    code, err = run_cli(capsys, "run", *TINY, "--c_rounds", "1", "--out", str(tmp_path / "o"))
    assert code == 130 and err.startswith("lptfl: stopped at once") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_an_internal_error_prints_one_line_and_logs_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(config, out_dir):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(runner, "Simulation", broken)
    code, err = run_cli(capsys, "run", *TINY, "--c_rounds", "1", "--out", str(tmp_path / "o"))
    assert code == 1 and err.startswith("lptfl: internal error: RuntimeError: simulated bug (traceback in ")
    log_file = Path(err.partition("traceback in ")[2].partition(";")[0])
    text = log_file.read_text()
    assert "Traceback" in text and "simulated bug" in text and "--c_rounds 1" in text
    log_file.unlink()


# -- 3. a failed start leaves nothing ------------------------------------------------------------


def test_a_run_failing_to_start_leaves_no_folder_and_the_corrected_command_runs(tmp_path, capsys):
    out = tmp_path / "runs" / "first"
    code, err = run_cli(capsys, "run", *TINY, "--c_rounds", "1", "--dataset", "fmnist",
                        "--data_path", str(tmp_path / "no-data"), "--out", str(out))
    assert code == 2 and "lptfl: error:" in err
    assert not (tmp_path / "runs").exists()  # the folders made for the run went again
    assert main(["run", *TINY, "--c_rounds", "1", "--out", str(out)]) == 0


def test_a_run_failing_in_round_1_leaves_its_existing_folder_empty(tmp_path, monkeypatch):
    def failing_round(self):
        raise RuntimeError("round 1 failed")

    monkeypatch.setattr(runner.Simulation, "run_round", failing_round)
    with pytest.raises(RuntimeError, match="round 1 failed"):
        runner.run_experiment(RunConfig(c_rounds=1, num_clients=3, model_width=4, compile="off",
                                        client_state="disk"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert runner.run_experiment(RunConfig(c_rounds=1, num_clients=3, model_width=4, compile="off"), tmp_path,
                                 progress=False)["rounds"] == 1


def test_a_refused_or_failed_resume_changes_nothing_in_the_run_folder(paused_run, capsys, monkeypatch):
    before = folder_hashes(paused_run)

    def unchanged() -> bool:
        return folder_hashes(paused_run) == before

    assert run_cli(capsys, "run", "--resume", str(paused_run), "--seed", "9")[0] == 2 and unchanged()
    assert run_cli(capsys, "run", "--resume", str(paused_run), "--frac", "0")[0] == 2 and unchanged()
    assert run_cli(capsys, "run", "--resume", str(paused_run), "--overwrite")[0] == 2 and unchanged()

    def failing_simulation(config, out_dir):
        raise ValueError("simulated set-up failure")

    with monkeypatch.context() as patch:  # set-up fails after the checks: config.json keeps c_rounds 3
        patch.setattr(runner, "Simulation", failing_simulation)
        assert run_cli(capsys, "run", "--resume", str(paused_run), "--c_rounds", "5")[0] == 2 and unchanged()
    original = (paused_run / ckpt.CHECKPOINT).read_bytes()
    rewrite_checkpoint_metadata(paused_run, lambda meta: meta.update(metrics_lines=7))  # more lines than written
    before = folder_hashes(paused_run)
    code, err = run_cli(capsys, "run", "--resume", str(paused_run), "--c_rounds", "5")
    assert code == 2 and "the checkpoint counts 7" in err and unchanged()
    (paused_run / ckpt.CHECKPOINT).write_bytes(original)
    assert main(["run", "--resume", str(paused_run), "--quiet"]) == 0


# -- 4. the published flags ----------------------------------------------------------------------


# the flag sets of the published ALL.sh (each dataset repeats them), on the embedded digits
ALL_SH_FLAGS = [
    "--block_dim BC --use_quantization --quantization_bits 8",
    "--block_dim BC --use_quantization --quantization_bits 8 --moving_average --ma_start 1 --moving_weight 0.9",
    "--block_dim BC --use_quantization --quantization_bits 6",
    "--block_dim BC --use_quantization --quantization_bits 6 --moving_average --ma_start 1 --moving_weight 0.9",
    "--block_dim BC --use_quantization --quantization_bits 4",
    "--block_dim BC --use_quantization --quantization_bits 4 --moving_average --ma_start 1 --moving_weight 0.9",
    "",
    "--moving_average --ma_start 1 --moving_weight 0.9",
]


@pytest.mark.parametrize("flags", ALL_SH_FLAGS)
def test_the_published_all_sh_commands_are_accepted(flags, caplog):
    argv = ["--dataset", "digits", "--alpha", "0.01", "--model_name", "ConvNet", "--c_rounds", "200",
            "--project_name", "FL_experiment", *flags.split(), "--batch_size", "32"]
    config = config_from_args(build_parser().parse_args(["run", *argv]))
    assert config.c_rounds == 200 and config.use_quantization == ("--use_quantization" in flags)
    assert "--project_name has no effect here" in caplog.text


def test_a_published_all_sh_command_runs(tmp_path, caplog):
    argv = ["--dataset", "digits", "--alpha", "0.01", "--model_name", "ConvNet", "--c_rounds", "1",
            "--project_name", "FL_experiment", "--block_dim", "BC", "--use_quantization", "--quantization_bits", "8",
            "--moving_average", "--ma_start", "1", "--moving_weight", "0.9", "--batch_size", "32"]
    assert main([*argv, *TINY, "--out", str(tmp_path)]) == 0  # flags only, as the published main.py
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_quantization"] and saved["moving_weight"] == 0.9 and "project_name" not in saved


def test_published_optimizer_schedule_and_algorithm_names():
    config = parsed("--optimizer", "Adam", "--lr_schedule", "CosineAnnealingLR", "--aggregation_mode", "fedtgp")
    assert (config.optimizer, config.lr_schedule, config.aggregation_mode) == ("adam", "cosine", "fedftg")
    assert parsed("--optimizer", "SGD").optimizer == "sgd" and parsed("--optimizer", "ADAM").optimizer == "adam"
    assert parsed("--optimizer", "Adam").fingerprint() == parsed("--optimizer", "adam").fingerprint()
    with pytest.raises(ValueError, match='optimizer: expected one of "adam", "sgd", "sgd-momentum", got "RMSprop"'):
        parsed("--optimizer", "RMSprop")


def test_published_fedgen_and_fedtgp_flags_set_our_settings():
    config = parsed("--ensemble_lr", "0.01", "--gen_batch_size", "16", "--generative_alpha", "0.2",
                    "--generative_beta", "1.5", "--ensemble_eta", "0.5", "--noise_dim", "8", "--hidden_dim", "24",
                    "--coef_decay", "0.9", "--train_generator_epoch", "2", "--g_lr", "0.02", "--s_lr", "0.001",
                    "--tgp_iteration", "3", "--inner_round_g", "2", "--inner_round_d", "4")
    assert config.fedgen_config().__dict__ == dict(alpha=0.2, beta=1.5, decay=0.9, lr=0.01, batch_size=16,
                                                    noise_dim=8, hidden=24, steps=2, diversity=0.5)
    ftg = config.fedftg_config()
    assert (ftg.gen_lr, ftg.lr, ftg.iterations, ftg.gen_rounds, ftg.distill_rounds) == (0.02, 0.001, 3, 2, 4)


def test_published_flags_without_effect_are_accepted_with_a_note(caplog):
    config = parsed("--project_name", "P", "--run_name", "r", "--result_path", "res", "--acc_path", "acc",
                    "--checkpoint_path", "ck", "--config_save_name", "c", "--ipc", "10", "--classes", "1", "2",
                    "--m", "4", "--ensemble_alpha", "0.5", "--ensemble_beta", "1", "--ensemble_epoch", "5",
                    "--use_embedding", "1", "--coef_decay_epoch", "2", "--min_samples_per_label", "3",
                    "--test_client", "--client_id", "1", "--global_test")
    assert config == RunConfig()
    for name in PUBLISHED_NO_OPS:
        assert f"--{name} has no effect here" in caplog.text
    caplog.clear()
    assert parsed("--ensemble_alpha", "1", "--use_embedding", "0", "--no-test_client") == RunConfig()
    assert "no effect" not in caplog.text  # the published defaults: the same as lptfl does


def test_a_published_json_config_runs_and_flags_override_it(tmp_path, caplog):
    path = tmp_path / "fmnist.json"
    path.write_text(json.dumps({**PUBLISHED_CONFIG, "project_name": "FL_experiment"}))  # as ALL.sh names it
    config = parsed("--config", str(path))
    assert (config.dataset, config.num_clients, config.seed, config.optimizer, config.lr_schedule) == (
        "fmnist", 80, 4, "adam", "none")
    assert (config.fedgen_lr, config.fedgen_diversity, config.fedftg_gen_lr, config.block_dim) == (3e-4, 0.0, 0.01, "B")
    assert f"{path}: project_name has no effect here" in caplog.text and caplog.text.count("no effect") == 1
    nested = tmp_path / "nested.json"  # the published script merges nested objects into one level
    nested.write_text(json.dumps({"data": {"dataset": "digits"}, "train": {"c_rounds": 1, "batch_size": 32}}))
    assert main(["run", "--config", str(nested), *TINY, "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["c_rounds"] == 1


def test_version_and_no_flags_for_every_boolean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip().startswith("lptfl ")
    booleans = [f.name for f in fields(RunConfig) if field_kind(f) == "bool"]
    for name in booleans:
        assert getattr(parsed(f"--{name}"), name) is True
        assert getattr(parsed(f"--{name}", f"--no-{name}"), name) is False
    args = build_parser().parse_args(["run", "--overwrite", "--no-overwrite", "--no-quiet", "--no-test_client"])
    assert args.overwrite is False and args.quiet is False


def test_the_published_sgd_is_plain_sgd():
    from torch import nn

    from lptfl.fl.client import make_optimizer

    params = list(nn.Linear(2, 2).parameters())
    assert make_optimizer("sgd", params, 0.1).param_groups[0]["momentum"] == 0
    assert make_optimizer("sgd-momentum", params, 0.1).param_groups[0]["momentum"] == 0.9


def test_too_many_clients_for_what_abavg_leaves_names_the_validation_fraction(tmp_path, capsys):
    code, err = run_cli(capsys, "run", *TINY, "--aggregation_mode", "abavg", "--abavg_val_fraction", "0.999",
                        "--num_clients", "3", "--out", str(tmp_path / "o"))
    assert code == 2 and "training samples that --abavg_val_fraction 0.999 leaves of digits" in err


def test_a_full_disk_names_the_folder_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    """The OSError of a full disk names no file: the message names the run folder, and resuming only
    where a checkpoint was written (a run that wrote no round is undone: run it again)."""
    from lptfl.experiment.run_dir import RunDirectory

    real_append = RunDirectory.append_metrics

    def full_from(round_index):
        def append(self, metrics):
            if metrics.round >= round_index:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_append(self, metrics)
        return append

    for first_full, out, advice in ((2, tmp_path / "o", f"continue with: lptfl run --resume {tmp_path / 'o'}"),
                                    (1, tmp_path / "p", "run the command again")):
        monkeypatch.setattr(RunDirectory, "append_metrics", full_from(first_full))
        code, err = run_cli(capsys, "run", *TINY, "--c_rounds", "2", "--out", str(out))
        assert code == 2 and err == (f"lptfl: error: [Errno {errno.ENOSPC}] No space left on device while writing "
                                     f"into {out}; free space there, then {advice}")
