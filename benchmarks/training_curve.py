"""Held-out loss against tokens seen, across the runs that made one checkpoint.

    python -m benchmarks.training_curve model/weights/tiny-coder/training_log_v1.jsonl \
        model/weights/tiny-coder/training_log_v2.jsonl ... --out benchmarks/results/training_loss.json

A checkpoint that was trained in several runs (each a restart from the previous run's exported
weights with a fresh optimizer) has one `dllm train` log per run, each counting steps and tokens
from zero. This joins them in the order given: a run's tokens are offset by the tokens of the runs
before it, up to the step that run was exported at (`--until`, one per log; default: its last
line), so the x axis is what the final weights have seen. Writes the points (JSON) and the
curve (PNG).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks import harness

log = logging.getLogger("dllm.training_curve")

SETS = {"held_out_loss": "v1 held-out set (stdlib, with tests)",
        "held_out_loss_code": "code held-out set (no tests)"}


def join_runs(logs: list[list[dict]], until: list[int | None]) -> list[dict]:
    """One point per held-out evaluation, with `tokens_total` counted across the runs."""
    points, offset = [], 0
    for run, (lines, last) in enumerate(zip(logs, until, strict=True)):
        kept = [x for x in lines if last is None or x["step"] <= last]
        for x in kept:
            if any(k in x for k in SETS):
                points.append({"run": run, "step": x["step"], "tokens": x["tokens"],
                               "tokens_total": offset + x["tokens"],
                               **{k: x[k] for k in SETS if k in x}})
        if kept:
            offset += kept[-1]["tokens"]
    return points


def _read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training_curve",
                                description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="dllm train logs (jsonl), oldest run first")
    p.add_argument("--labels", nargs="+", default=None, help="one name per run")
    p.add_argument("--until", type=int, nargs="+", default=None,
                   help="the step each run was exported at (default: its last line)")
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    labels = args.labels or [Path(x).stem for x in args.logs]
    until = args.until or [None] * len(args.logs)
    if len(labels) != len(args.logs) or len(until) != len(args.logs):
        p.error("--labels and --until take one value per log")
    points = join_runs([_read(x) for x in args.logs], until)
    # where each run began on the x axis: its first point less the tokens it had seen by then
    starts = [next((q["tokens_total"] - q["tokens"] for q in points if q["run"] == i), None)
              for i in range(len(labels))]
    out = harness.write_results("training_loss", {"runs": labels, "points": points}, args.out)
    fig, ax = harness.figure(figsize=(7, 4.5))
    for key, name in SETS.items():
        xs = [q["tokens_total"] / 1e6 for q in points if key in q]
        ys = [q[key] for q in points if key in q]
        if xs:
            ax.plot(xs, ys, marker=".", label=name)
    for label, x in zip(labels, starts, strict=True):
        if x is not None:
            ax.axvline(x / 1e6, color="grey", lw=0.5)
            ax.text(x / 1e6, ax.get_ylim()[1], label, fontsize=7, rotation=90, va="top")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("held-out NELBO (nats/token)")
    ax.legend()
    harness.save_figure(fig, out)
    log.info("%d points from %d runs -> %s", len(points), len(labels), out)


if __name__ == "__main__":
    main()
