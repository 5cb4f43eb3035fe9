"""Claim checks on finished runs (lptfl.report.margin_verdicts, window_verdicts)."""

from __future__ import annotations

import pytest

from lptfl.report import margin_verdicts, window_verdicts

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
