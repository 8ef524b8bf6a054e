"""benchmarks/bench_context.py runs end to end at toy size: gpu_check's context section on the CPU
(the same code paths as on the GPU, 256 and 1024 tokens) and the CLI's sweep in child processes."""

from __future__ import annotations

import json

from benchmarks import bench_context


def test_gpu_section_runs_on_the_cpu_at_toy_size(tmp_path):
    result = bench_context.gpu_section(tiny=True)
    assert [r["context"] for r in result["sweep"]] == [256, 1024]
    for r in result["sweep"]:
        assert "error" not in r, r
        assert r["prefill_s"] > 0 and r["step_ms"] > 0
        # the pool holds the context: KV bytes per token x (context + margin), from the shape
        assert r["kv_pool_bytes"] >= r["kv_bytes_per_token"] * r["context"]
    one, chunked = result["stall"]
    assert (one["mode"], chunked["mode"]) == ("one_pass", "chunked")
    assert one["a_deltas_during_prefill"] >= 1 and chunked["a_deltas_during_prefill"] >= 1
    assert "a_gap_max_vs_one_pass" in chunked
    png = bench_context.plot(result, tmp_path / "context.json")
    assert png.exists() and png.stat().st_size > 1000
    assert "stall chunked" in bench_context.format_table(result)


def test_cli_writes_json_and_png(tmp_path):
    out = tmp_path / "context.json"
    bench_context.main(["--lengths", "256", "--stall-length", "512", "--chunk", "128",
                        "--layers", "2", "--d-model", "32", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["sweep"][0]["context"] == 256 and "peak_rss_mib" in doc["sweep"][0]
    assert doc["machine"]["cpu"] and len(doc["stall"]) == 2
    assert out.with_suffix(".png").exists()
