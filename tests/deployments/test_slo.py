"""The step controller by latency target (deployments/slo.py), the step cost model it reads
(engine/cost_model.py), the quality table, the per-request budget and what comes back in usage
and headers. Pure logic and the local app (mock engine): no Ray."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random

import pytest

from autoscaling.load import ClusterLoad, ReplicaLoad, cluster_load, mean_step_cost
from benchmarks.mock_engine import MockEngine, MockEngineConfig
from deployments.config import parse_args
from deployments.protocol import CompletionRequest
from deployments.quality_table import (
    isotonic,
    load_quality_table,
    quality_table_path,
    rung_qualities,
)
from deployments.slo import (
    LatencyCalibration,
    RequestShape,
    SloConfig,
    SloRouter,
    StepModel,
    make_router,
    predict,
)
from deployments.step_router import Ladder, StepRouter
from engine.cost_model import StepCost, StepCostModel
from engine.types import GenerationRequest
from model.sampling import SamplingParams

# tiny-coder on one core of the 2-core CPU, roughly (bench_engine: 42 ms at 1 row, 260 at 16)
COEF = [0.027, 0.0, 0.00045, 0.0]
SHAPE = RequestShape(prompt_tokens=20, max_new_tokens=64, block_length=32)
LADDER = Ladder(steps=[16, 8, 4, 2])
QUALITY = [0.14, 0.06, 0.05, 0.02]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def snapshot(replicas: int = 1, running: int = 0, queued: int = 0, coef=COEF) -> ClusterLoad:
    return ClusterLoad(replicas=replicas, running=running, queued=queued, max_num_seqs=32,
                       step_cost={"coef": list(coef), "samples": 100.0}, at=1.0)


def router(clock=None, **slo) -> SloRouter:
    r = SloRouter(LADDER, SloConfig(**slo), QUALITY, clock=clock or Clock())
    r.observe(snapshot())
    return r


def arrive(r: SloRouter, rps: float, clock: Clock) -> None:
    """Make the router's rate window hold `rps` requests/s of SHAPE (admitted and done)."""
    r._admits = collections.deque(clock.t - i / rps for i in range(int(rps * r.slo.rate_window_s)))
    r.mean_shape = SHAPE


# --- the step cost model ---------------------------------------------------------------------
def test_cost_model_recovers_the_step_time_it_is_fed():
    rng = random.Random(0)
    m = StepCostModel(forget=1.0)
    true = (0.02, 0.001, 0.0004, 0.003)
    for _ in range(300):
        rows = rng.randint(1, 16)
        tokens = rows * 32 + rng.choice([0, 0, 0, 40, 200])  # cache writes on some iterations
        kp = rows * 32 * rng.randint(20, 300) / 1000
        y = true[0] + true[1] * rows + true[2] * tokens + true[3] * kp
        m.add(rows, tokens, kp, y * (1 + rng.gauss(0, 0.01)))
    fit = m.fit()
    assert fit.fitted and all(c >= 0 for c in fit.coef)
    assert fit.predict(8, 256, 40.0) == pytest.approx(
        true[0] + 8 * true[1] + 256 * true[2] + 40.0 * true[3], rel=0.03)
    assert StepCost.from_dict(fit.to_dict()) == fit


def test_cost_model_never_prices_load_as_free():
    """Collinear features (every step one 32-token row per sequence) and noise: no negative
    coefficient, so a bigger batch is never predicted faster."""
    rng = random.Random(1)
    m = StepCostModel()
    for _ in range(100):
        rows = rng.randint(1, 16)
        m.add(rows, 32 * rows, 0.0, 0.03 + 0.014 * rows + rng.gauss(0, 0.004))
    fit = m.fit()
    assert min(fit.coef) >= 0
    assert fit.predict(16, 512) > fit.predict(8, 256) > fit.predict(1, 32) > 0
    assert fit.predict(16, 512) == pytest.approx(0.03 + 0.014 * 16, rel=0.1)


async def test_engines_publish_their_fit_and_the_board_averages_it():
    eng = MockEngine(MockEngineConfig(step_delay_s=0.002, token_cost_s=0.0001, max_num_seqs=4))
    await eng.start()
    try:
        reqs = [GenerationRequest(f"r{i}", [5, 6, 7] * (i + 1),
                                  SamplingParams(max_new_tokens=16, block_length=8, steps=4,
                                                 stop_token_ids=[])) for i in range(6)]
        for r in reqs:
            async for _ in eng.submit(r):
                pass
        stats = eng.stats()
    finally:
        await eng.shutdown()
    cost = StepCost.from_dict(stats.step_cost)
    assert cost.fitted
    # a step is 2 ms + 0.1 ms per token (plus scheduling noise): the fit says so
    assert cost.predict(1, 8) == pytest.approx(0.002 + 0.0008, abs=0.002)
    load = ReplicaLoad.from_stats("a", stats)
    assert load.max_num_seqs == 4 and load.step_cost == stats.step_cost
    twice = cluster_load([load, ReplicaLoad.from_dict({**load.to_dict(), "replica_id": "b"})])
    assert twice.step_cost["coef"] == pytest.approx(stats.step_cost["coef"])
    assert mean_step_cost([{}, {"coef": [0, 0, 0, 0], "samples": 50}]) == {}


# --- the quality table ---------------------------------------------------------------------------
def test_isotonic_pools_violators():
    assert isotonic([0.02, 0.06, 0.14, 0.10, 0.12, 0.30]) == pytest.approx(
        [0.02, 0.06, 0.12, 0.12, 0.12, 0.30])
    assert isotonic([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_rung_qualities_from_a_table_and_the_monotone_default():
    rows = [{"steps_per_block": s, "block_length": 32, "parse_rate": q}
            for s, q in [(1, 0.02), (2, 0.06), (4, 0.14), (8, 0.10), (16, 0.12), (32, 0.30)]]
    assert rung_qualities(LADDER, rows) == pytest.approx([0.12, 0.12, 0.12, 0.06])
    # a threshold rung with no measured row: valued at half its cap (16 -> 8 steps' quality)
    lad = Ladder(steps=[32, 16, 16], confidence_thresholds=[None, None, 0.9])
    assert rung_qualities(lad, rows) == pytest.approx([0.30, 0.12, 0.12])
    # measured threshold rows win; between measured steps, log2 interpolation
    rows2 = rows + [{"steps_per_block": 16, "block_length": 32, "confidence_threshold": 0.9,
                     "parse_rate": 0.2}]
    assert rung_qualities(lad, rows2)[2] == pytest.approx(0.2)
    assert rung_qualities(Ladder(steps=[24, 2]), rows)[0] == pytest.approx(
        0.12 + (math.log2(24) - 4) * (0.30 - 0.12))
    assert rung_qualities(LADDER, []) == [1.0, 0.75, 0.5, 0.25]
    assert rung_qualities(Ladder(steps=[8, 2], quality=[0.9, 0.1]), rows) == [0.9, 0.1]


def test_tiny_coder_ships_its_quality_table():
    path = quality_table_path("tiny-coder")
    rows = load_quality_table(path)
    assert {r["steps_per_block"] for r in rows} >= {2, 4, 8, 16}
    q = rung_qualities(LADDER, rows, "parse_rate", 32)
    assert q == sorted(q, reverse=True) and q[0] > q[-1]
    r = make_router(parse_args({}))
    assert isinstance(r, SloRouter) and r.qualities == pytest.approx(q)
    assert isinstance(make_router(parse_args({"ladder": {"control": "thresholds"}})), StepRouter)
    assert load_quality_table(path.parent / "missing.json") == []


def test_slo_and_ladder_config_validation():
    a = parse_args({"slo": {"latency_p95_s": 3.0, "ttft_p95_s": 0.5},
                    "ladder": {"steps": [16, 16, 8], "confidence_thresholds": [None, 0.9, None]}})
    assert a.slo.latency_p95_s == 3.0 and a.ladder.thresholds_of() == [None, 0.9, None]
    for bad, match in [({"slo": {"latency_p95s": 1}}, "latency_p95s"),
                       ({"slo": {"latency_p95_s": 0}}, "latency_p95_s"),
                       ({"ladder": {"steps": [16, 16]}}, "decrease"),
                       ({"ladder": {"steps": [16, 8], "confidence_thresholds": [0.9]}},
                        "one entry per rung"),
                       ({"ladder": {"steps": [16, 8], "confidence_thresholds": [None, 1.5]}},
                        r"\(0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            parse_args(bad)


# --- the prediction ------------------------------------------------------------------------
def test_prediction_unloaded_loaded_and_overloaded():
    model = StepModel(*COEF)
    p = SHAPE.passes(16)
    assert p == 32
    idle = predict(model, SHAPE, p, 16, 0, 0.0, SHAPE, p, 32)
    step1 = COEF[0] + COEF[2] * 32  # one 32-token row
    assert idle.latency_s == pytest.approx(p * step1 + COEF[2] * (20 + 32))
    assert idle.wait_s == 0 and idle.rows == 1
    # 5 rows already running: the request shares every step with them
    busy = predict(model, SHAPE, p, 16, 5, 0.0, SHAPE, p, 32)
    assert busy.latency_s == pytest.approx(p * (COEF[0] + 6 * COEF[2] * 32) + COEF[2] * 52)
    # a sustained rate: Little's law; more rate, more latency; past capacity, unbounded
    lat = [predict(model, SHAPE, p, 16, 0, lam, SHAPE, p, 32).latency_s for lam in (1, 1.5, 2)]
    assert idle.latency_s < lat[0] < lat[1] < lat[2]
    capacity_rps = 1 / (p * COEF[2] * 32)
    assert math.isinf(predict(model, SHAPE, p, 16, 0, capacity_rps * 1.01, SHAPE, p,
                              32).latency_s)
    # slots full: it waits for rows to finish
    full = predict(model, SHAPE, p, 16, 40, 0.0, SHAPE, p, 32)
    assert full.wait_s > 0 and full.rows == 32
    # ... unless it has a budget: the engine admits it ahead of the queue, into a priority slot
    urgent = predict(model, SHAPE, p, 16, 40, 0.0, SHAPE, p, 32, priority=True)
    assert urgent.wait_s == 0 and urgent.rows == 33
    assert urgent.latency_s == pytest.approx(p * (COEF[0] + 33 * COEF[2] * 32) + COEF[2] * 52)


# --- the controller ----------------------------------------------------------------------------
def test_picks_the_best_rung_whose_prediction_meets_the_target():
    clock = Clock()
    r = router(clock, latency_p95_s=2.5)
    for rps in (0.2, 1.5, 3.0, 6.0, 12.0):
        arrive(r, rps, clock)
        r.observe(snapshot())
        preds = [r.predict_rung(SHAPE, k).latency_s for k in range(4)]
        ok = [k for k in range(4) if preds[k] <= 2.5]
        want = min(ok) if ok else 3
        r.rung = 0  # from the top, so the hysteresis does not hold it
        r.observe(snapshot())
        assert r.rung == want, (rps, preds)
        c = r.choose(shape=SHAPE)
        assert (c.steps, c.reason) == (LADDER.steps[want], "load")
        assert c.predicted_latency_s == pytest.approx(preds[want])
        assert c.target_s == 2.5 and c.quality == QUALITY[want]


def test_lone_users_keep_the_best_rung_under_the_default_target():
    """No target configured: 2x the unloaded best-quality latency; one or two clients sending
    back to back never degrade themselves."""
    clock = Clock()
    r = router(clock)
    one = r.unloaded_s(SHAPE)
    assert r.target_s(SHAPE) == pytest.approx(2 * one)
    for clients in (1, 2):
        arrive(r, clients / one, clock)  # closed loop: each client's next request at once
        for running in range(clients):
            r.observe(snapshot(running=running))
            assert r.choose(shape=SHAPE).steps == 16


def test_down_at_once_up_after_the_hold_and_no_flapping():
    clock = Clock()
    r = router(clock, latency_p95_s=2.5, hysteresis=0.2, up_hold_s=2.0)
    arrive(r, 6.0, clock)
    r.observe(snapshot())
    low = r.rung
    assert low >= 2  # a 3x overload of the best rung: straight down
    # load oscillating around the boundary every 0.5 s: it does not climb back
    rungs = []
    for i in range(20):
        clock.t += 0.5
        arrive(r, 6.0 if i % 2 else 4.0, clock)
        r.observe(snapshot())
        rungs.append(r.rung)
    assert len(set(rungs)) <= 2 and rungs[-1] >= 1
    # load gone: back to the best rung in one move, only after up_hold_s
    arrive(r, 0.1, clock)
    r.observe(snapshot())
    before = r.rung
    clock.t += 1.9
    r.observe(snapshot())
    assert r.rung == before
    clock.t += 0.2
    r.observe(snapshot())
    assert r.rung == 0


def test_new_replicas_restore_quality():
    """The same offered load over twice the replicas: the prediction allows the best rung."""
    clock = Clock()
    r = router(clock, latency_p95_s=3.0, up_hold_s=1.0)
    arrive(r, 3.0, clock)
    r.observe(snapshot(replicas=1))
    assert r.rung > 0
    r.observe(snapshot(replicas=4))
    clock.t += 1.1
    r.observe(snapshot(replicas=4))
    assert r.rung == 0


def test_after_a_burst_it_climbs_to_more_steps_even_where_the_table_ties():
    """tiny-coder's table values 8, 4 and 2 steps per block alike (parse rate 0 at each, 0.12 at
    16): a tie the table cannot resolve is no reason to stay at 2 steps once 8 fit again."""
    clock = Clock()
    r = SloRouter(LADDER, SloConfig(latency_p95_s=2.5, up_hold_s=1.0), [0.12, 0.0, 0.0, 0.0],
                  clock=clock)
    r.observe(snapshot())
    arrive(r, 20.0, clock)
    r.observe(snapshot())
    assert LADDER.steps[r.rung] == 2
    arrive(r, 2.0, clock)  # 8 steps meet the target again, 16 do not
    r.observe(snapshot())
    assert LADDER.steps[r.rung] == 2  # not before the hold
    clock.t += 1.1
    arrive(r, 2.0, clock)
    r.observe(snapshot())
    assert LADDER.steps[r.rung] == 8


def test_a_burst_is_counted_before_the_next_snapshot():
    """64 requests at once on an idle snapshot: each sees the rows admitted before it."""
    clock = Clock()
    r = router(clock, latency_p95_s=2.5)
    chosen = []
    for _ in range(64):
        c = r.choose(shape=SHAPE)
        chosen.append(c.steps)
        r.admitted(1000.0, 1, SHAPE)
    assert chosen[0] == 16 and chosen[-1] == 2
    assert chosen == sorted(chosen, reverse=True)
    assert r.ledger_rows() == 64
    # back-to-back requests that finish leave the ledger: one client is no burst
    r2 = router(clock)
    for _ in range(10):
        c = r2.choose(shape=SHAPE)
        key = r2.admitted(1000.0, 1, SHAPE)
        clock.t += c.model_latency_s  # the client's next request once this one is answered
        r2.done(key)
        assert c.steps == 16


def test_budget_pin_and_quality_bounds():
    clock = Clock()
    r = router(clock, latency_p95_s=5.0)
    arrive(r, 0.5, clock)
    r.observe(snapshot(running=1))
    assert r.choose(shape=SHAPE).steps == 16  # unbudgeted: best quality
    preds = [r.predict_rung(SHAPE, k, r.rung, priority=True).latency_s for k in range(4)]
    budget = (preds[1] + preds[2]) / 2  # rung 2 is the best one that fits
    c = r.choose(shape=SHAPE, budget_s=budget)
    assert (c.steps, c.reason, c.target_s) == (4, "budget", budget)
    assert c.predicted_latency_s <= budget
    assert r.rung == 0  # the budget moved that request alone
    # quality bounds the budget; an impossible budget gets the fastest rung the bound allows
    assert r.choose(quality="max", shape=SHAPE, budget_s=budget).steps == 16
    assert r.choose(quality="balanced", shape=SHAPE, budget_s=1e-3).steps == 8
    assert r.choose(shape=SHAPE, budget_s=1e-3).steps == 2
    pinned = r.choose(12, "fast", shape=SHAPE, budget_s=1e-3)
    assert (pinned.steps, pinned.rung, pinned.reason, pinned.predicted_latency_s) == \
        (12, None, "pinned", None)


def test_ttft_target_and_threshold_rungs():
    clock = Clock()
    lad = Ladder(steps=[16, 16, 4], confidence_thresholds=[None, 0.9, None])
    r = SloRouter(lad, SloConfig(latency_p95_s=100.0, ttft_p95_s=0.5), [0.3, 0.2, 0.1],
                  clock=clock)
    r.observe(snapshot())
    long = RequestShape(prompt_tokens=20, max_new_tokens=256, block_length=32)
    # the whole answer meets 100 s anywhere; the first block at 16 steps does not meet 0.5 s
    first16 = r.predict_rung(long, 0).ttft_s
    assert first16 > 0.5
    c = r.choose(shape=long)
    assert c.steps == 16 and c.confidence_threshold == 0.9 and c.setting == "16@0.9"
    # the threshold rung's passes are learnt from what requests really took
    for _ in range(50):
        r.finished(c, scheduled_passes=long.passes(16), used_passes=long.passes(16) // 8)
    assert r.pass_ratio[1] == pytest.approx(1 / 8, rel=0.05)
    assert r.pass_ratio[0] == 1.0


def test_latency_calibration_follows_measurements():
    clock = Clock()
    r = router(clock, latency_p95_s=5.0)
    first = r.choose(shape=SHAPE)
    for _ in range(60):
        c = r.choose(shape=SHAPE)
        assert c.model_latency_s == pytest.approx(first.model_latency_s)
        r.finished(c, SHAPE.passes(16), SHAPE.passes(16), latency_s=1.5 * c.model_latency_s)
    # one predicted latency only: an offset, not a factor
    assert r.calibration.ratio == pytest.approx(1.0)
    assert r.calibration.overhead_s == pytest.approx(0.5 * first.model_latency_s, rel=0.05)
    # ... and every request took exactly the calibrated mean: the p95 is that mean
    assert r.calibration.p95_factor(1.25) == pytest.approx(1.0, abs=0.01)
    assert r.choose(shape=SHAPE).predicted_latency_s == pytest.approx(
        1.5 * first.model_latency_s, rel=0.05)
    # requests of several lengths: overhead and ratio told apart (0.1 s + 1.3 x), the ratio
    # shrunk towards 1 by the prior's two requests (0.3%)
    cal = LatencyCalibration()
    for x in [0.2, 0.5, 1.0, 2.0, 4.0] * 20:
        cal.add(x, 0.1 + 1.3 * x)
    assert (cal.overhead_s, cal.ratio) == (pytest.approx(0.1, abs=0.01),
                                           pytest.approx(1.3, rel=0.01))
    assert cal(3.0) == pytest.approx(0.1 + 3.9, rel=0.01)
    # ... and with every prediction alike (one or two rows at admission, the latency not
    # following them: the rows overlap for part of an answer) the prior holds the ratio near 1
    # (fitted freely: 0.2, the clamp)
    flat = LatencyCalibration()
    rng = random.Random(1)
    for _ in range(60):
        flat.add(rng.choice([0.45, 0.49]), 0.05 + 0.47 * rng.uniform(0.8, 1.4))
    assert 0.7 < flat.ratio < 1.25
    # the p95 over the mean: the default until measured, then the measured spread
    spread = LatencyCalibration()
    assert spread.p95_factor(1.25) == 1.25
    rng = random.Random(0)
    for _ in range(200):
        x = rng.choice([0.5, 1.0, 2.0])
        spread.add(x, x * rng.choice([1.0] * 9 + [2.0]))  # one in ten takes twice as long
    assert spread.p95_factor(1.25) == pytest.approx(2.0 / (1.1), rel=0.15)


# --- the API -----------------------------------------------------------------------------------
def test_latency_budget_field():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "x", "latency_budget_ms": 300})
    assert ok.latency_budget_ms == 300
    for bad in (0, -5, 1e9, "soon"):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate({"model": "m", "prompt": "x",
                                              "latency_budget_ms": bad})


async def test_setting_and_prediction_come_back_in_usage_and_headers(local_api):
    clock = Clock()
    lad = Ladder(steps=[16, 8, 8], confidence_thresholds=[None, None, 0.8])
    slo_router = SloRouter(lad, SloConfig(latency_p95_s=10.0), [0.3, 0.2, 0.1], clock=clock)
    async with local_api(mock={"step_delay_s": 0.0}, router=slo_router, fixed_load=True) as api:
        api.fixed_load.load = snapshot()
        await api.service.load_cache.refresh()
        body = {"model": "test-coder", "prompt": "def f(x):", "max_tokens": 64}
        r = await api.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert (u["denoising_steps_per_block"], u["denoising_setting"]) == (16, "16")
        assert u["latency_target_ms"] == 10000.0
        assert 0 < u["predicted_latency_ms"] < 10000.0
        assert r.headers["x-denoising-setting"] == "16"
        assert float(r.headers["x-predicted-latency-ms"]) == pytest.approx(
            u["predicted_latency_ms"], abs=1)
        assert api.backend.requests[-1].params.confidence_threshold is None
        assert api.backend.requests[-1].latency_budget_s is None
        # a budget only the threshold rung is predicted to meet: that request alone gets it
        preds = [slo_router.predict_rung(slo_router.mean_shape, k, 0, priority=True).latency_s
                 for k in range(3)]
        budget_ms = 1000 * (preds[1] + preds[2]) / 2
        r = await api.client.post("/v1/completions",
                                  json={**body, "latency_budget_ms": budget_ms, "stream": True,
                                        "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        u = chunks[-1]["usage"]
        assert u["denoising_setting"] == "8@0.8" and u["denoising_confidence_threshold"] == 0.8
        assert u["latency_target_ms"] == pytest.approx(budget_ms, abs=0.1)
        assert r.headers["x-denoising-setting"] == "8@0.8"
        assert api.backend.requests[-1].params.confidence_threshold == 0.8
        assert api.backend.requests[-1].params.steps == 8
        # ... and the engines admit it ahead of their queues
        assert api.backend.requests[-1].latency_budget_s == pytest.approx(budget_ms / 1000)
        # the request's own threshold wins over the rung's; a pin has no prediction
        # (the budget again between rungs 1 and 2: the answers so far calibrated the model)
        preds = [slo_router.predict_rung(slo_router.mean_shape, k, 0, priority=True).latency_s
                 for k in range(3)]
        budget_ms = 1000 * (preds[1] + preds[2]) / 2
        r = await api.client.post("/v1/completions", json={
            **body, "latency_budget_ms": budget_ms, "confidence_threshold": 0.95})
        assert r.json()["usage"]["denoising_setting"] == "8@0.95"
        r = await api.client.post("/v1/completions", json={**body, "denoising_steps": 4,
                                                           "latency_budget_ms": 1})
        u = r.json()["usage"]
        assert u["denoising_setting"] == "4" and "predicted_latency_ms" not in u
        assert "x-predicted-latency-ms" not in r.headers
        # /health shows the controller's state
        h = (await api.client.get("/health")).json()
        assert h["slo"]["setting"] == "16" and h["slo"]["control"] == "slo"
        # bad budgets are 400s in the OpenAI envelope
        r = await api.client.post("/v1/completions", json={**body, "latency_budget_ms": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "latency_budget_ms"


def test_own_passes_take_the_tail_and_the_load_the_mean():
    """Answers stop at EOS: the p95 request is a long one, the load is the mean one; and an
    answer that stopped early does not teach the latency calibration that steps are faster."""
    r = router(Clock(), latency_p95_s=5.0)
    c = r.choose(shape=SHAPE)
    full = SHAPE.passes(16)
    for i in range(40):
        used = full if i % 10 == 0 else full // 4
        r.finished(c, full, used, latency_s=c.model_latency_s * used / c.predicted_passes)
    own, _ = r._passes(SHAPE, 0, tail=True)
    mean, _ = r._passes(SHAPE, 0)
    assert own == full  # one in ten ran to its end: the 95th percentile is a whole answer
    assert mean < 0.5 * full
    # every latency was exactly the model's at the passes used: calibration stays the identity
    assert r.calibration(1.0) == pytest.approx(1.0, abs=1e-6)


def test_an_unidentified_fit_gives_way_to_the_prior():
    """A replica that so far ran one row at a time cannot tell fixed from per-row cost: the
    controller assumes half and half of its one-row step instead of extrapolating the fit."""
    one_row = COEF[0] + 32 * COEF[2]
    narrow = ClusterLoad(replicas=1, step_cost={"coef": COEF, "samples": 50.0,
                                                "rows_spread": 0.1}, at=1.0)
    m = StepModel.from_load(narrow)
    assert (m.a, m.b, m.c) == (pytest.approx(one_row / 2), pytest.approx(one_row / 2), 0.0)
    wide = ClusterLoad(replicas=1, step_cost={"coef": COEF, "samples": 50.0,
                                              "rows_spread": 3.0}, at=1.0)
    assert StepModel.from_load(wide) == StepModel(*COEF)
    assert StepModel.from_load(ClusterLoad(replicas=1, step_latency_ms=40.0)).a == \
        pytest.approx(0.02)
    # the engine's fit says how wide its batches were
    fit = StepCostModel()
    for rows in (1, 1, 1, 1, 1, 1):
        fit.add(rows, 32 * rows, 0.0, 0.04)
    assert fit.fit().rows_spread == pytest.approx(0.0, abs=1e-6)
    for rows in (4, 8, 16):
        fit.add(rows, 32 * rows, 0.0, 0.02 + 0.015 * rows)
    assert fit.fit().rows_spread > 2


def test_the_p95_spread_of_a_burst_does_not_outlive_it():
    clock = Clock()
    cal = LatencyCalibration(clock=clock)
    for i in range(40):
        cal.add(1.0, 1.0 if i % 2 else 3.0)  # a burst: half the answers 3x the mean
    assert cal.p95_factor(1.25) > 1.4
    clock.t += 20.0  # past the window: back to the default
    assert cal.p95_factor(1.25) == 1.25
    # the mean calibration forgets by time too: a burst's 2x is outweighed by a few requests
    for x in (0.5, 1.0, 2.0) * 10:
        cal.add(x, 2 * x)
    assert cal.ratio == pytest.approx(2.0, rel=0.05)
    clock.t += 60.0
    for x in (0.5, 1.0, 2.0):
        cal.add(x, x)
    assert cal.ratio < 1.2  # from 2.0: the old samples weigh 2^-6 each


def test_rows_ahead_counts_each_request_once():
    """The snapshot plus what was admitted after it, minus what it saw that has finished."""
    wall = Clock()
    r = SloRouter(LADDER, SloConfig(), QUALITY, clock=Clock(), wall=wall, report_lag_s=0.25)
    a = r.admitted(1000.0, 1, SHAPE)  # the other client's request, admitted at wall 100.0
    wall.t += 0.2
    b = r.admitted(1000.0, 1, SHAPE)  # this client's previous request
    wall.t += 0.6
    r.done(b)  # finished at 100.8
    # a snapshot stamped 100.7 (reports up to 0.25 s older): it counts both a and b running
    stale = ClusterLoad(replicas=1, running=2, at=100.7)
    assert r.rows_ahead(stale) == 1  # a only: b is in it but finished since
    fresh = ClusterLoad(replicas=1, running=1, at=101.5)
    assert r.rows_ahead(fresh) == 1  # a, seen by the snapshot, not again from the ledger
    wall.t += 0.5
    r.admitted(1000.0, 2, SHAPE)  # two choices admitted after every snapshot so far
    assert r.rows_ahead(fresh) == 1 + 2
    r.done(a)
    assert r.rows_ahead(ClusterLoad(replicas=1, running=0, at=0.0)) == 2  # no snapshot yet


def test_the_default_target_is_what_an_idle_replica_takes_not_what_a_burst_does():
    """Under a burst the steps slow down and answers take far longer than the step model says
    (queueing, shared cores); the calibration learns it. The default target, 2x the unloaded
    latency, keeps the step model and calibration of the last quiet moment that five more
    seconds of quiet confirmed, instead of growing with the burst: not the burst's first
    second, which the snapshot still shows as quiet. Quiet again for those five seconds, it
    follows the calibration the predictions use (lone users stay at the best rung)."""
    clock = Clock()
    r = router(clock)
    r.mean_shape = SHAPE
    for x in (0.5, 1.0, 2.0) * 10:  # quiet: answers take 0.05 s + the model
        r.calibration.add(x, 0.05 + x)
    for _ in range(6):
        clock.t += 1.0
        r.observe(snapshot(running=1))
    quiet_target = r.target_s(SHAPE)
    # the burst's first second: the first answers overtaken by it (3x the model) while the
    # snapshot still shows one row
    for x in (0.5, 1.0, 2.0) * 3:
        clock.t += 0.1
        r.calibration.add(x, 3 * x)
        r.observe(snapshot(running=1))
    assert r.calibration.ratio > 1.5
    # then the burst: the steps slow down (shared cores) and answers take 3x even that model
    r.observe(snapshot(running=32, queued=40, coef=[2 * c for c in COEF]))
    for x in (0.5, 1.0, 2.0) * 10:
        clock.t += 1.0
        r.calibration.add(x, 3 * x)
        r.observe(snapshot(running=32, queued=40, coef=[2 * c for c in COEF]))
    assert r.calibration.ratio == pytest.approx(3.0, rel=0.2)  # the predictions know it ...
    assert r.target_s(SHAPE) == pytest.approx(quiet_target)  # ... the target does not move
    r.observe(snapshot(running=1))  # quiet again: confirmed after 5 s, today's calibration
    assert r.target_s(SHAPE) == pytest.approx(quiet_target)
    for _ in range(6):
        clock.t += 1.0
        r.observe(snapshot(running=1))
    assert r.target_s(SHAPE) > 2 * quiet_target
    for _ in range(3):  # back to the best rung after the hold: a lone user is not degraded
        clock.t += 1.0
        r.observe(snapshot(running=1))
    assert r.choose(shape=SHAPE).steps == 16


def test_a_burst_shows_in_the_arrival_rate_within_a_second():
    """2 req/s for 5 s, then 12 requests in half a second: the rate is the last second's
    (13/s), not the 5 s window's 4.4/s; a lull must last the whole window."""
    clock = Clock()
    r = router(clock)
    for _ in range(10):
        clock.t += 0.5
        r.admitted(1000.0, 1, SHAPE)
    assert r.arrival_rps() == pytest.approx(2.0)
    for _ in range(12):
        clock.t += 0.5 / 12
        r.admitted(1000.0, 1, SHAPE)
    assert r.arrival_rps() == pytest.approx(13 / 1.0)  # and the steady one 0.5 s before
    clock.t += 2.0  # the burst left the short window, not the long one
    assert r.arrival_rps() == pytest.approx(len(r._admits) / 5.0)


def test_a_poisson_clump_is_not_a_burst():
    """0.8 req/s, then three requests within one second (a clump a Poisson load shows about
    twice a minute): the rate stays the 5 s window's, not 3/s; a fourth and fifth in that
    second make it a burst."""
    clock = Clock()
    r = router(clock)
    for _ in range(4):
        clock.t += 1.25
        r.admitted(1000.0, 1, SHAPE)
    clock.t += 1.25
    for _ in range(3):
        clock.t += 0.2
        r.admitted(1000.0, 1, SHAPE)
    assert r.arrival_rps() == pytest.approx(len(r._admits) / 5.0)
    assert r.arrival_rps() < 1.5
    for _ in range(2):
        clock.t += 0.1
        r.admitted(1000.0, 1, SHAPE)
    assert r.arrival_rps() == pytest.approx(5 / 1.0)


def test_past_capacity_at_every_rung_the_fastest_rung():
    r = router(Clock(), latency_p95_s=1.0)
    arrive(r, 1000.0, Clock())  # far past what any rung sustains
    preds = [r.predict_rung(SHAPE, k) for k in range(4)]
    assert all(math.isinf(p.latency_s) for p in preds)
    assert r.best_rung(preds, 1.0) == 3


async def test_the_mock_engine_admits_budgeted_requests_first_into_priority_slots():
    """benchmarks/mock_engine.py admits as engine.Engine does: one slot held and two plain
    requests queued, a budgeted request runs next to it at once and finishes first."""
    eng = MockEngine(MockEngineConfig(step_delay_s=0.002, max_num_seqs=1, priority_slots=1))
    await eng.start()
    params = SamplingParams(max_new_tokens=16, block_length=8, steps=4, stop_token_ids=[])
    done: list[str] = []

    async def run(r):
        async for _ in eng.submit(r):
            pass
        done.append(r.request_id)

    try:
        plain = [asyncio.create_task(run(GenerationRequest(f"p{i}", [5, 6, 7], params)))
                 for i in range(3)]
        await asyncio.sleep(0.01)
        urgent = GenerationRequest("u", [5, 6, 7], params, latency_budget_s=0.1)
        await asyncio.gather(run(urgent), *plain)
    finally:
        await eng.shutdown()
    assert done.index("u") < done.index("p1") < done.index("p2")  # FIFO: u would be last


def closed_loop(r: SloRouter, clock: Clock, model: StepModel, clients: int, until: float,
                coef: list[float], seed: int = 3, jitter=(0.8, 1.2)) -> list[int]:
    """`clients` clients sending back to back (the next request as the answer arrives): each
    answer takes the step model's time at its steps for the rows it shares with, give or
    take 20%; the snapshot lags a quarter second. -> the steps of every answer."""
    rng = random.Random(seed)
    running: dict[int, float] = {}  # ledger key -> finish time
    nxt = [clock.t + 0.13 * i for i in range(clients)]
    steps = []
    while clock.t < until:
        clock.t = min(min(nxt), min(running.values(), default=math.inf))
        for key, end in list(running.items()):
            if end <= clock.t:
                r.done(key)
                del running[key]
        for i, at in enumerate(nxt):
            if at > clock.t:
                continue
            r.observe(ClusterLoad(replicas=1, running=len(running), max_num_seqs=32,
                                  step_cost={"coef": coef, "samples": 100.0},
                                  at=clock.t - 0.25))
            c = r.choose(shape=SHAPE)
            steps.append(c.steps)
            key = r.admitted(1000.0, 1, SHAPE)
            p = SHAPE.passes(c.steps)
            latency = model.service_s(SHAPE, p, len(running) + 1) * rng.uniform(*jitter)
            r.finished(c, p, p, latency)
            running[key] = clock.t + latency
            nxt[i] = clock.t + latency
    return steps


def test_two_closed_loop_clients_on_a_fast_replica_keep_the_best_rung():
    """Two clients sending back to back to a replica 5x faster than COEF's (answers of ~0.3 s:
    5-7 arrivals in a second, by chance more in one second than the last five's mean).
    Every answer is at the best rung."""
    clock = Clock()
    fast = [c / 5 for c in COEF]
    r = SloRouter(LADDER, SloConfig(), QUALITY, clock=clock, wall=clock)
    steps = closed_loop(r, clock, StepModel(*fast), 2, 160.0, fast)
    assert len(steps) > 300
    assert steps.count(16) == len(steps)
    # ... and the calibration learnt from them still prices the faster rungs as faster (the
    # rows at admission overstate how much of an answer two rows share: fitted freely the
    # ratio went to 0.2 and 2 steps looked 0.83x as slow as 16)
    preds = [r.predict_rung(SHAPE, k).latency_s for k in range(4)]
    assert preds[3] < 0.4 * preds[0]


def test_closed_loop_clients_at_a_fast_rung_climb_back_to_the_best():
    """Left at a faster rung (a burst just ended), two closed-loop clients send twice as often
    as they would at the best rung: as an open-loop rate that is past the best rung's
    capacity, but these clients wait for their answers, so the best rung only slows them
    down. Seeing that the arrivals follow the answers, the controller predicts the best rung
    with the clients' rows, climbs back after the hold and stays (a set target of 0.7 s: the
    default one lets lone users straight back, below)."""
    clock = Clock()
    fast = [c / 5 for c in COEF]
    r = SloRouter(LADDER, SloConfig(latency_p95_s=0.7), QUALITY, clock=clock, wall=clock)
    closed_loop(r, clock, StepModel(*fast), 1, 110.0, fast)  # one client: the target settles
    r.rung = 1
    steps = closed_loop(r, clock, StepModel(*fast), 2, 140.0, fast, seed=4)
    assert steps[:5] == [8] * 5
    first_best = steps.index(16)
    assert steps[first_best:] == [16] * (len(steps) - first_best)
    assert first_best < len(steps) / 4


def test_open_loop_arrivals_are_not_taken_for_closed_loop_clients():
    """Poisson arrivals at 12 req/s, answers finishing at the same rate: some arrivals land
    just after an answer by chance; the estimate subtracts that and finds no population."""
    clock = Clock()
    r = SloRouter(LADDER, SloConfig(), QUALITY, clock=clock, wall=clock)
    rng = random.Random(5)
    keys: list[tuple[float, int]] = []
    while clock.t < 120.0:
        clock.t += rng.expovariate(12.0)
        while keys and keys[0][0] <= clock.t:
            r.done(keys.pop(0)[1])
        keys.append((clock.t + 0.4, r.admitted(1000.0, 1, SHAPE)))
        if clock.t > 106.0:
            assert r.closed_loop_population() is None


def test_one_odd_step_model_does_not_set_the_default_target():
    """Quiet throughout; for one snapshot the replicas' fit says steps are 3x faster (a fit on
    a handful of steps). The target, the median of the confirmed quiet moments, never follows
    it, neither then nor when that moment is confirmed five seconds later."""
    clock = Clock()
    r = router(clock)
    r.mean_shape = SHAPE
    targets = []
    for i in range(60):
        clock.t += 0.25
        coef = [c / 3 for c in COEF] if i == 30 else COEF
        r.observe(snapshot(running=1, coef=coef))
        targets.append(r.target_s(SHAPE))
    settled = targets[25]
    assert all(t == pytest.approx(settled, rel=0.05) for t in targets[25:])


def test_two_clients_whose_answers_vary_keep_the_best_rung_under_the_default_target():
    """One client alone (answers as the model says: a tight p95), then two whose answers vary
    by 1.0-1.8x: the predictions carry that spread, the target the lone client's. Lone
    users are served at the best rung all the same."""
    clock = Clock()
    fast = [c / 5 for c in COEF]
    r = SloRouter(LADDER, SloConfig(), QUALITY, clock=clock, wall=clock)
    assert set(closed_loop(r, clock, StepModel(*fast), 1, 110.0, fast, jitter=(1.0, 1.0))) == {16}
    steps = closed_loop(r, clock, StepModel(*fast), 2, 140.0, fast, seed=4, jitter=(1.0, 1.8))
    assert set(steps) == {16}
