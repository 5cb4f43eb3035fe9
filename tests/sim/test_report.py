"""Claim checks on finished runs (lptfl.report.margin_verdicts, window_verdicts)."""

from __future__ import annotations

import pytest

from lptfl.report import margin_verdicts, paired_differences, seed_of, seed_rows, window_verdicts

MARGINS = (("fp32-noavg", -1.0), ("q8-noavg", 3.0))


def rows(**means: float) -> dict[str, dict]:
    return {name.replace("_", "-"): {"mean": mean} for name, mean in means.items()}


def test_verdicts_hold_at_the_margins_and_fail_just_past_them():
    assert margin_verdicts(rows(q8_avg=80.0, fp32_noavg=81.0, q8_noavg=77.0), "q8-avg", MARGINS) == [
        "- q8-avg >= fp32-noavg - 1.0 points: 80.00 vs 81.00 - 1.0: holds",
        "- q8-avg >= q8-noavg + 3.0 points: 80.00 vs 77.00 + 3.0: holds",
    ]
    failed = margin_verdicts(rows(q8_avg=79.9, fp32_noavg=81.0, q8_noavg=77.0), "q8-avg", MARGINS)
    assert [line.rsplit(": ", 1)[1] for line in failed] == ["does not hold", "does not hold"]


def test_missing_runs_are_left_out():
    assert margin_verdicts(rows(q8_avg=80.0, q8_noavg=70.0), "q8-avg", MARGINS) == [
        "- q8-avg >= q8-noavg + 3.0 points: 80.00 vs 70.00 + 3.0: holds",
    ]
    assert margin_verdicts(rows(fp32_noavg=80.0), "q8-avg", MARGINS) == []


def curves(**accuracies: list[float]) -> dict[str, dict]:
    return {name.replace("_", "-"): {"curve": curve} for name, curve in accuracies.items()}


def test_window_verdicts_count_the_windows_that_hold():
    # fp32-noavg swings: its last window is high, earlier ones low; q8-avg is flat at 80.
    fp32 = [70.0] * 6 + [90.0] * 5
    lines = window_verdicts(curves(q8_avg=[80.0] * 12, fp32_noavg=fp32, q8_noavg=[76.0] * 11), "q8-avg",
                            MARGINS, first_end=5)
    # windows end at rounds 5..11 (7 of them); the ones ending at 5, 6 and 7 average at most 78 (hold),
    # ending at 8: (70*3+90*2)/5 = 78 (holds), 9: 82 (fails), 10: 86, 11: 90.
    assert lines == [
        "- q8-avg >= fp32-noavg - 1.0 points: holds in 4 of 7 windows ending at rounds 5-11 "
        "(mean over rounds 1-11: 80.00 vs 79.09)",
        "- q8-avg >= q8-noavg + 3.0 points: holds in 7 of 7 windows ending at rounds 5-11 "
        "(mean over rounds 1-11: 80.00 vs 76.00)",
    ]


def test_window_verdicts_leave_out_pairs_too_short_or_missing():
    short = curves(q8_avg=[80.0] * 10, fp32_noavg=[80.0] * 6)
    assert window_verdicts(short, "q8-avg", MARGINS, first_end=7) == []
    assert window_verdicts(short, "q8-noavg", MARGINS, first_end=7) == []
    with pytest.raises(ValueError, match="first_end=3"):
        window_verdicts(short, "q8-avg", MARGINS, first_end=3)


def seeded(**means: dict[int, float]) -> dict[str, dict]:
    """describe()-like rows for runs ``<config>`` (seed 0) and ``<config>-s<seed>``."""
    out = {}
    for name, by_seed in means.items():
        config = name.replace("_", "-")
        for seed, mean in by_seed.items():
            out[config if seed == 0 else f"{config}-s{seed}"] = {
                "mean": mean, "mean_fp32_act": mean + 1, "mean_policy_act": mean, "rounds": 200}
    return out


def test_seed_rows_give_mean_and_sample_sd_over_seeds():
    groups = seed_rows(seeded(q8_avg={0: 80.0, 1: 82.0, 2: 84.0}))
    group = groups["q8-avg"]
    assert group["seeds"] == [0, 1, 2] and group["rounds"] == 200
    assert group["mean"] == pytest.approx(82.0) and group["mean_sd"] == pytest.approx(2.0)
    assert group["mean_fp32_act"] == pytest.approx(83.0)
    assert seed_of("q8-avg-dlsr-s2") == ("q8-avg-dlsr", 2) and seed_of("q8-avg-dlsr") == ("q8-avg-dlsr", 0)


def test_paired_differences_pair_seeds_and_judge_the_mean():
    # q8-avg is 2 points under fp32-noavg on every seed: a paired sd of 0 however the seeds swing
    groups = seed_rows(seeded(q8_avg={0: 70.0, 1: 80.0, 2: 90.0}, fp32_noavg={0: 72.0, 1: 82.0, 2: 92.0},
                              q8_noavg={0: 60.0, 1: 70.0}))
    lines = paired_differences(groups, "q8-avg", MARGINS)
    assert lines[0].startswith("- q8-avg - fp32-noavg >= -1.0 points: -2.00 +- 0.00 over 3 seeds")
    assert lines[0].endswith("does not hold")
    assert "over 2 seeds (s0 +10.0, s1 +10.0): holds" in lines[1]


def test_a_tie_on_paired_seeds_reads_plus_zero():
    # 0.1 + 0.2 - 0.3 style residues: differences of +1e-15 and -1e-15 must not print as -0.00 or -0.0
    groups = seed_rows(seeded(q8_avg={0: 70.0 + 1e-13, 1: 80.0 - 2e-13}, fp32_noavg={0: 70.0, 1: 80.0}))
    (line,) = paired_differences(groups, "q8-avg", MARGINS[:1])
    assert ": +0.00 +- 0.00 over 2 seeds (s0 +0.0, s1 +0.0): holds" in line
