"""Quality per ladder rung, from the model's measured quality table.

    rows = load_quality_table(quality_table_path("tiny-coder"))   # `dllm eval`'s rows
    rung_qualities(Ladder(steps=[16, 8, 4, 2]), rows)             # best rung first

The table is `dllm eval`'s output (benchmarks/quality.py) shipped beside a checkpoint as
quality.json: a metric (parse rate, FIM exact match, ...) per steps per block. The step controller
(deployments/slo.py) values each rung with it, so it knows what every step down costs; without a
table the default is monotone (1.0 for the best rung down to 1 / rungs).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from deployments.step_router import Ladder

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.json"  # `dllm eval`'s output, beside a checkpoint's config.json


def load_quality_table(path: str | Path | None) -> list[dict]:
    """The rows of a `dllm eval` result (benchmarks/quality.py), [] when there is none."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        return []
    try:
        rows = json.loads(p.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError) as e:
        log.warning("quality table %s unreadable (%s): monotone default", p, e)
        return []
    return [r for r in rows if isinstance(r, dict) and "steps_per_block" in r]


def quality_table_path(source: str, configured: str | None = None) -> Path | None:
    """Where the model's quality table is: the configured path, else quality.json in the
    checkpoint directory (the embedded tiny-coder's for the preset)."""
    if configured:
        return Path(configured)
    if source == "tiny-coder":
        from model.checkpoint import EMBEDDED_DIR

        return EMBEDDED_DIR / QUALITY_FILE
    p = Path(source)
    return p / QUALITY_FILE if p.is_dir() else None


def isotonic(xs: list[float]) -> list[float]:
    """Pool-adjacent-violators: the non-decreasing sequence closest to xs (least squares).
    The table's metric is a mean over ~50 cases (+-0.05), so a dip between two step counts is
    read as noise, not as fewer steps being better."""
    blocks: list[list[float]] = []  # [sum, count]
    for x in xs:
        blocks.append([x, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out += [s / n] * int(n)
    return out


def rung_qualities(ladder: Ladder, rows: list[dict], metric: str = "parse_rate",
                   block_length: int | None = None,
                   threshold_passes: float = 0.5) -> list[float]:
    """Quality of every rung, best first. From the table: its `metric` over steps per block
    (rows of the model's block length when it has such rows), made monotone in steps, and
    interpolated in log2(steps) between measured counts; a threshold rung without a measured
    row is valued at the steps its passes amount to (`threshold_passes` of the cap). Without a
    table (or the metric): 1.0 for the best rung down to 1 / rungs for the last (monotone)."""
    if ladder.quality is not None:
        return list(ladder.quality)
    thr = ladder.thresholds_of()
    n = len(ladder.steps)
    usable = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if block_length is not None and any(r.get("block_length") == block_length for r in usable):
        usable = [r for r in usable if r.get("block_length") == block_length]
    plain = sorted((r for r in usable if r.get("confidence_threshold") is None),
                   key=lambda r: r["steps_per_block"])
    if not plain:
        return [1.0 - i / n for i in range(n)]
    steps = [float(r["steps_per_block"]) for r in plain]
    values = isotonic([float(r[metric]) for r in plain])

    def at(s: float) -> float:
        if s <= steps[0]:
            return values[0]
        if s >= steps[-1]:
            return values[-1]
        pts = list(zip(steps, values, strict=True))
        for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
            if s0 <= s <= s1:
                w = (math.log2(s) - math.log2(s0)) / max(math.log2(s1) - math.log2(s0), 1e-9)
                return v0 + w * (v1 - v0)
        return values[-1]

    out = []
    for s, t in zip(ladder.steps, thr, strict=True):
        if t is None:
            out.append(at(s))
            continue
        measured = [r for r in usable if r.get("confidence_threshold") == t
                    and r["steps_per_block"] == s]
        out.append(float(measured[0][metric]) if measured else at(max(1.0, s * threshold_passes)))
    return out


__all__ = ["QUALITY_FILE", "isotonic", "load_quality_table", "quality_table_path",
           "rung_qualities"]
