"""bench_burst's bookkeeping on synthetic outcomes: schedules, delivered quality, the phase
summary and the issue's goals (the Ray run itself is the benchmark, not a test)."""

from __future__ import annotations

import pytest

from benchmarks.bench_burst import (
    Outcome,
    Schedule,
    Second,
    goals,
    quality_of,
    quality_rows,
    summarize,
    variant_args,
)


def test_schedule_is_seeded_and_budgets_a_share():
    s = Schedule(base_rps=2.0, burst_factor=4.0, quiet_s=10, burst_s=10, after_s=10,
                 budget_share=0.25, budget_ms=300.0)
    a = s.arrivals()
    assert a == s.arrivals() and a == sorted(a)
    burst = sum(1 for t in a if 10 <= t < 20)
    assert burst > 2 * sum(1 for t in a if t < 10)  # 8 req/s against 2
    share = sum(s.budgeted()) / len(a)
    assert 0.1 < share < 0.4
    assert not any(Schedule(budget_ms=None).budgeted())


def test_quality_of_a_setting_reads_the_shipped_table():
    table = [{"steps_per_block": s, "block_length": 32, "parse_rate": q}
             for s, q in [(2, 0.02), (4, 0.06), (16, 0.14)]]
    assert quality_of("16", table) == pytest.approx(0.14)
    assert quality_of("2", table) < quality_of("4", table) <= quality_of("16", table)
    assert quality_of("16@0.9", table) == pytest.approx(0.10)  # valued at 8 steps: log2 midway
    assert quality_of(None, table) is None
    rows = quality_rows()  # tiny-coder's own table, its 32-step row the best
    best = next(r["parse_rate"] for r in rows if r["steps_per_block"] == 32)
    assert quality_of("32", rows) == pytest.approx(best) and quality_of("2", rows) < best


def test_summary_and_goals():
    sched = Schedule(base_rps=1.0, quiet_s=10, burst_s=10, after_s=10, budget_ms=500.0)
    outs = [Outcome(sent_at=t, done_at=t + 1.0, status=200, steps=16, setting="16")
            for t in range(10)]
    outs += [Outcome(sent_at=10 + t / 2, done_at=10 + t / 2 + 1.5, status=200, steps=2,
                     setting="2") for t in range(20)]
    outs += [Outcome(sent_at=12.0, budgeted=True, done_at=12.4, status=200, steps=2,
                     setting="2"), Outcome(sent_at=13.0, status=429, done_at=13.1)]
    secs = [Second(t=t, rung=0 if t < 10 or t >= 24 else 3, replicas=1 if t < 15 else 2,
                   starting=1 if 12 <= t < 15 else 0) for t in range(30)]
    rows = quality_rows()
    s = summarize(secs, outs, sched, rows, unloaded_p95_s=1.0)
    assert s["quiet"]["p95_over_unloaded"] == pytest.approx(1.0)
    assert s["quiet"]["best_quality_share"] == 1.0
    assert s["burst"]["p95_over_unloaded"] == pytest.approx(1.5)
    assert s["burst"]["rejected"] == 1 and s["burst"]["budgeted"] == 1
    assert s["burst"]["budgeted_met_share"] == 1.0
    assert s["burst"]["mean_quality"] == pytest.approx(quality_of("2", rows))
    assert s["best_quality_back_s_after_burst"] == 4
    assert s["replica_start_s"] == 3
    g = goals({"adaptive": {"summary": s}}, 1.0, sched)
    assert g["adaptive_burst_p95_within_2x"] is True
    assert g["adaptive_restored_within_start_plus_30s"] is True
    assert g["adaptive_budget_met_at_p95"] is True


def test_variants_name_their_policies():
    a = variant_args("adaptive", "real", 2, 1.0, 1.0)
    assert a["ladder"]["control"] == "slo" and "policy" in a["server"]["autoscaling_config"]
    assert variant_args("ladder", "real", 2, 1.0, 1.0)["ladder"]["control"] == "thresholds"
    fixed = variant_args("fixed", "mock", 2, 1.0, 1.0)
    assert fixed["ladder"]["steps"] == [16]
    assert fixed["server"]["autoscaling_config"]["target_ongoing_requests"] == 2
    assert variant_args("fixed-4", "real", 2, 1.0, 1.0)["ladder"]["steps"] == [4]
    with pytest.raises(ValueError):
        variant_args("nope", "real", 2, 1.0, 1.0)
