"""benchmarks/harness.py: the machine record, results paths, the load generators' bounds, and a
real (tiny) bench run writing its JSON + PNG with the record. No Ray."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import pytest

from benchmarks import harness

RECORD_KEYS = {"cpu", "cores", "torch", "triton", "torch_threads", "gpu", "date", "command",
               "note", "omp_wait_policy", "cpu_isa"}


@pytest.fixture()
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path))
    return tmp_path


def test_machine_record_shape():
    p = argparse.ArgumentParser(prog="dllm bench demo")
    p.add_argument("--n", type=int)
    harness.parse_args(p, ["--n", "3", "--note", "nothing else running"])
    rec = harness.machine_record()
    assert set(rec) == RECORD_KEYS
    assert rec["command"] == "dllm bench demo --n 3 --note 'nothing else running'"
    assert rec["note"] == "nothing else running"
    assert isinstance(rec["cpu"], str) and rec["cpu"]
    assert isinstance(rec["cores"], int) and rec["cores"] >= 1
    assert rec["torch"] and rec["torch_threads"] >= 1
    assert rec["date"][:2] == "20" and "T" in rec["date"]


def test_write_results_goes_to_the_results_dir(results_dir):
    path = harness.write_results("demo", {"rows": [1, 2]})
    assert path == results_dir / "demo.json"
    doc = json.loads(path.read_text())
    assert doc["rows"] == [1, 2] and set(doc["machine"]) == RECORD_KEYS


def test_bench_sampler_writes_json_with_the_record(results_dir):
    from benchmarks import bench_sampler

    committed = harness.RESULTS / "bench_sampler.json"
    before = committed.read_bytes() if committed.exists() else None
    argv = ["--new-tokens", "8", "--block-length", "8", "--steps", "1", "--repeats", "1"]
    bench_sampler.main(argv)
    doc = json.loads((results_dir / "bench_sampler.json").read_text())
    assert set(doc["machine"]) == RECORD_KEYS
    assert doc["machine"]["command"] == "dllm bench sampler " + " ".join(argv)
    assert [r["setting"] for r in doc["rows"]] == ["autoregressive", "spb1", "spb1-nocache"]
    assert all(r["new_tokens"] == 8 and r["tokens_per_s"] > 0 for r in doc["rows"])
    assert (results_dir / "bench_sampler.png").stat().st_size > 1000
    if before is not None:  # the committed result is never overwritten by a smoke run
        assert committed.read_bytes() == before


def test_closed_loop_bounds_count_and_concurrency():
    running, peak, seen = 0, 0, []

    async def call(i, _client):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        seen.append(i)
        return i

    wall, results = asyncio.run(harness.closed_loop(call, concurrency=3, total=10))
    assert sorted(results) == list(range(10)) == sorted(seen)
    assert peak == 3 and wall > 0


def test_closed_loop_stops_at_max_s():
    async def call(i, _client):
        await asyncio.sleep(0.2)
        return i

    t0 = time.monotonic()
    _, results = asyncio.run(harness.closed_loop(call, concurrency=2, total=100, max_s=0.3))
    assert time.monotonic() - t0 < 1.0
    assert len(results) <= 4  # two clients, at most two whole calls each within 0.3 s


def test_open_loop_does_not_wait_for_slow_calls_and_is_time_bounded():
    sent = []

    async def call(i):
        sent.append((i, time.monotonic()))
        await asyncio.sleep(0.05 if i < 3 else 10.0)  # the last one outlives the bound
        return i

    t0 = time.monotonic()
    wall, results = asyncio.run(harness.open_loop(call, [0.0, 0.01, 0.02, 0.03, 5.0],
                                                  max_s=0.5))
    assert wall < 1.0 and time.monotonic() - t0 < 1.0
    assert [i for i, _ in sent] == [0, 1, 2, 3]  # the arrival at 5 s is past max_s
    assert sent[3][1] - sent[0][1] < 0.05 + 0.02  # not held back by the earlier calls
    assert sorted(results) == [0, 1, 2]  # the slow one was cancelled


def test_agreement():
    a = {"r1": [1, 2, 3, 4], "r2": [5, 6]}
    assert harness.agreement(a, a) == 1.0
    assert harness.agreement(a, {"r1": [1, 2, 0, 4], "r2": [5]}) == pytest.approx(4 / 6)
    assert harness.agreement(a, {"r1": [1, 2, 3, 4]}) == pytest.approx(4 / 6)


def test_load_only_to_loopback():
    assert harness.require_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert harness.require_loopback("http://localhost:1") == "http://localhost:1"
    assert harness.require_loopback("http://[::1]:1") == "http://[::1]:1"
    for url in ("http://10.0.0.5:8000", "https://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            harness.require_loopback(url)


def test_free_port_is_bindable():
    import socket

    port = harness.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_run_engine_gives_generate_tokens():
    """The engine's closed loop and generate one after another agree at temperature 0."""
    from benchmarks.bench_engine import make_requests
    from model.loaders import load_pretrained
    from model.sampling import SamplingParams

    net, tok, _ = load_pretrained("tiny-coder", progress=False)
    params = SamplingParams(max_new_tokens=16, block_length=8, steps=4, stop_token_ids=[])
    reqs = make_requests(tok, 3, params)
    row = asyncio.run(harness.run_engine(net, tok, reqs, concurrency=2, max_num_seqs=2,
                                         keep_tokens=True, count_steps=True))
    ref = harness.run_generate(net, reqs, keep_tokens=True)
    assert row["output_tokens"] == ref["output_tokens"] == 3 * 16
    assert harness.agreement(row["tokens"], ref["tokens"]) == 1.0
    assert row["token_steps"] > 0 and row["tokens_per_row_step"] > 0
