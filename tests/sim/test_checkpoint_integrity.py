"""Checkpoint integrity (issue 35, point 4): checksums over every tensor and the metadata, range-checked
metadata, refusals that change nothing in the run folder, and repair advice that works when followed."""

import json
import re
import struct
from pathlib import Path

import pytest
from test_cli_input import TINY, folder_hashes, rewrite_checkpoint_metadata, run_cli

from lptfl.cli import main
from lptfl.experiment import checkpoint as ckpt
from lptfl.experiment.run_dir import REPAIR


@pytest.fixture
def paused_disk_run(tmp_path):
    """A run paused after round 2 of 3, its client optimizer state on disk (so with a snapshot)."""
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--c_rounds", "3", "--stop_after", "2", "--client_state", "disk",
                 "--out", str(run_dir)]) == 0
    return run_dir


def header(path: Path) -> tuple[int, dict]:
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return size, json.loads(path.read_bytes()[8 : 8 + size])


def flip_low_bits(path: Path, tensor: str, count: int) -> None:
    """XOR the lowest mantissa bit of the first ``count`` float32 values of ``tensor`` in the file."""
    size, head = header(path)
    start = 8 + size + head[tensor]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    for index in range(count):
        data[start + 4 * index] ^= 1  # little endian: byte 0 holds the lowest mantissa bits
    path.write_bytes(bytes(data))


def refused(capsys, run_dir: Path) -> str:
    """Resume ``run_dir``; it must be refused with one line and change nothing there. The line."""
    before = folder_hashes(run_dir)
    code, err = run_cli(capsys, "run", "--resume", str(run_dir))
    assert code == 2 and err.startswith("lptfl: error: "), err
    assert folder_hashes(run_dir) == before
    return err


def test_flipped_low_bits_of_a_weight_are_refused_naming_file_and_tensor(paused_disk_run, capsys):
    path = paused_disk_run / ckpt.CHECKPOINT
    tensor = next(name for name, entry in header(path)[1].items()
                  if name.startswith("server.global.") and entry["dtype"] == "F32" and "weight" in name)
    flip_low_bits(path, tensor, 20)
    err = refused(capsys, paused_disk_run)
    assert err == (f"lptfl: error: {path}: tensor {tensor!r} fails its checksum (the file is corrupted); "
                   "restore the file from a copy, or start the run again with --overwrite")


def test_client_state_tensors_are_checksummed_too(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", *TINY, "--c_rounds", "2", "--stop_after", "1", "--client_state", "memory",
                 "--out", str(run_dir)]) == 0
    path = run_dir / ckpt.CHECKPOINT
    tensor = next(name for name in header(path)[1] if name.startswith("store.") and name.endswith(".exp_avg"))
    flip_low_bits(path, tensor, 1)
    assert f"tensor {tensor!r} fails its checksum" in refused(capsys, run_dir)


def test_edited_metadata_fails_its_checksum(paused_disk_run, capsys):
    rewrite_checkpoint_metadata(paused_disk_run, lambda meta: meta.update(wall_time_s=0.5), reseal=False)
    assert "its metadata fails its checksum (the file is corrupted)" in refused(capsys, paused_disk_run)


@pytest.mark.parametrize("version", [1, 2])
def test_a_checkpoint_of_an_older_format_says_so_in_one_line(paused_disk_run, capsys, version):
    rewrite_checkpoint_metadata(paused_disk_run, lambda meta: meta.update(version=version))
    assert (f"was written by an older lptfl (checkpoint format v{version}, this lptfl reads v3); start the run again "
            "with --overwrite") in refused(capsys, paused_disk_run)


@pytest.mark.parametrize("change, message", [
    (dict(round=-1), "round is -1, expected a int >= 0"),
    (dict(round=True), "round is True, expected a int >= 0"),
    (dict(metrics_lines="2"), "metrics_lines is '2', expected a int >= 0"),
    (dict(wall_time_s=float("nan")), "wall_time_s is nan, expected a float >= 0"),
    (dict(client_mode="cloud"), "client_mode is 'cloud', expected one of none, memory, disk"),
    (dict(clients=[0, -3]), "clients is [0, -3], expected a list of client indices"),
    (dict(snapshot="../../elsewhere"), "snapshot is '../../elsewhere', expected a folder checkpoint-client_state-"),
    (dict(round=1), "round is 1, its server state's round is 2"),
    (dict(metrics_lines=1), "records round 2 but the 1 lines of metrics.jsonl it counts end with round 1"),
    (dict(metrics_lines=3), "has 2 complete lines; the checkpoint counts 3"),
])
def test_out_of_range_metadata_is_refused(paused_disk_run, capsys, change, message):
    rewrite_checkpoint_metadata(paused_disk_run, lambda meta: meta.update(change))
    assert message in refused(capsys, paused_disk_run)


def test_a_snapshot_outside_the_run_folder_is_refused(paused_disk_run, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = paused_disk_run / f"{ckpt.SNAPSHOT_PREFIX}000002-deadbeef"
    link.symlink_to(outside, target_is_directory=True)
    rewrite_checkpoint_metadata(paused_disk_run, lambda meta: meta.update(snapshot=link.name))
    assert "lies outside the run folder" in refused(capsys, paused_disk_run)
    link.unlink()
    assert "client-state snapshot" in refused(capsys, paused_disk_run)  # now missing


def advised_command(err: str) -> list[str]:
    """The command between backticks in an error line, as argv for :func:`main` (without ``lptfl``)."""
    found = re.search(r"`lptfl ([^`]+)`", err)
    assert found, err
    return found.group(1).split()


def test_the_advice_for_a_torn_metrics_line_works_when_followed(paused_disk_run, capsys):
    """A run killed while appending a line: report names the command that repairs it; following
    it literally resumes the run, and report then works."""
    with open(paused_disk_run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"round": 3, "train_lo')
    code, err = run_cli(capsys, "report", str(paused_disk_run))
    assert code == 2 and "--resume" in err
    assert main(advised_command(err)) == 0
    capsys.readouterr()
    code, _ = run_cli(capsys, "report", str(paused_disk_run))
    assert code == 0


def test_a_damaged_line_the_checkpoint_counts_gets_advice_that_does_not_loop(paused_disk_run, capsys):
    """Damage inside the checkpointed rounds (a torn line 1 followed by others): resuming cannot repair it,
    so report does not advise it, and the resume refuses (changing nothing) with the same advice."""
    path = paused_disk_run / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0][:10], *lines[1:]]))
    code, err = run_cli(capsys, "report", str(paused_disk_run))
    assert code == 2 and "line 1 is not JSON" in err and "--resume" not in err
    assert err.rstrip().endswith("restore the file from a copy, or start the run again with --overwrite")
    before = folder_hashes(paused_disk_run)
    code, err = run_cli(capsys, "run", "--resume", str(paused_disk_run))
    assert code == 2 and "line 1 is damaged and the checkpoint counts it" in err and "--resume" not in err
    assert folder_hashes(paused_disk_run) == before


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:5], "is truncated (its header is cut short)"),
    (lambda data: (10**9).to_bytes(8, "little") + data[8:], "is truncated (its header is cut short)"),
    (lambda data: len(b"[] ").to_bytes(8, "little") + b"[] " + data[8:], "is not an lptfl checkpoint"),
    (lambda data: len(b"{}").to_bytes(8, "little") + b"{}", "is not an lptfl checkpoint"),
])
def test_a_damaged_checkpoint_header_is_named_with_what_to_do(paused_disk_run, capsys, damage, message):
    path = paused_disk_run / ckpt.CHECKPOINT
    path.write_bytes(damage(path.read_bytes()))
    err = refused(capsys, paused_disk_run)
    assert err.startswith(f"lptfl: error: {path} {message}") and err.endswith(REPAIR)
