"""Claim checks on finished runs (lptfl.report.margin_verdicts)."""

from __future__ import annotations

from lptfl.report import margin_verdicts

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
