"""Held-out loss across restarted runs: tokens count on from the step each run was exported at."""

import json

from benchmarks.training_curve import join_runs, main


def test_runs_join_on_the_exported_step(tmp_path, monkeypatch):
    first = [{"step": 1, "tokens": 100}, {"step": 2, "tokens": 200, "held_out_loss": 5.0},
             {"step": 3, "tokens": 300, "held_out_loss": 4.9}]  # step 3 ran after the export
    second = [{"step": 1, "tokens": 50, "held_out_loss": 4.8, "held_out_loss_code": 4.7}]
    points = join_runs([first, second], [2, None])
    assert [(q["run"], q["tokens_total"]) for q in points] == [(0, 200), (1, 250)]
    assert points[1]["held_out_loss_code"] == 4.7 and "held_out_loss_code" not in points[0]
    assert [q["tokens_total"] - q["tokens"] for q in points] == [0, 200]  # where each run began

    monkeypatch.setenv("DLLM_RESULTS_DIR", str(tmp_path))
    logs = []
    for i, lines in enumerate((first, second)):
        logs.append(tmp_path / f"log{i}.jsonl")
        logs[-1].write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "curve.json"
    main([str(x) for x in logs] + ["--until", "2", "3", "--labels", "a", "b", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["runs"] == ["a", "b"] and len(saved["points"]) == 2
    assert (tmp_path / "curve.png").stat().st_size > 0
