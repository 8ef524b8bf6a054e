"""`dllm bench exact-samplers`: what the authors' exact scoring rules cost per commit step.

    python -m benchmarks.bench_exact_samplers            # Dream / LLaDA vocabularies, 32 rows
    python -m benchmarks.bench_exact_samplers --rows 8 --repeats 3

model/sampling.commit_step on random logits at the published vocabularies, side by side in one
run: Dream's raw scores (this project's earlier default) against its nucleus scores (softmax of
the tempered, top-p-truncated logits, Dream's own; scoring "nucleus"), at T = 0 and at Dream's
T = 0.2, top_p 0.95; LLaDA's low_confidence without and with the exact confidence_eos_eot_inf
(a second softmax with EOS/EoT removed, for the rows that ask); Fast-dLLM v2's sub-block
threshold against the plain threshold. Times are medians of --repeats, on whatever runs torch
here (the CPU reference path without a GPU; the Triton kernel on one); the ratios to each
group's baseline are what to read. Writes benchmarks/results/bench_exact_samplers.json / .png.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import harness
from model.sampling import commit_step

DREAM_VOCAB, LLADA_VOCAB = 152064, 126464
LLADA_EOS, LLADA_EOT = 126081, 126348


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step(logits, *, rule="low_confidence", temperature=0.0, top_p=1.0, threshold=None,
          sampled=False, conf_inf=None, sub_block=None):
    """One commit_step over B rows of Lb masked positions (logits [B, Lb, V])."""
    B, Lb, _ = logits.shape
    dev = logits.device
    full = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt, device=dev)  # noqa: E731
    block = torch.zeros(B, Lb, dtype=torch.long, device=dev)  # mask id 0: every position masked
    pos = torch.arange(Lb, device=dev).expand(B, Lb)

    def run():
        commit_step(logits, block, pos, full(0, torch.long), full(4, torch.long), mask_id=0,
                    rules=[rule] * B, temperature=full(temperature), top_p=full(top_p),
                    seeds=full(1, torch.long),
                    threshold=full(threshold if threshold is not None else float("nan")),
                    last_step=full(False, torch.bool),
                    sampled=full(True, torch.bool) if sampled else None,
                    conf_inf_ids=[conf_inf] * B if conf_inf else None,
                    sub_block=(pos // 8) if sub_block else None)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench exact-samplers", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32, help="masked positions per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    dream = (torch.randn(1, args.rows, DREAM_VOCAB, generator=g) * 3).to(args.device)
    llada = (torch.randn(1, args.rows, LLADA_VOCAB, generator=g) * 3).to(args.device)
    cases = [  # (group, name, logits, kwargs); the first of each group is its baseline
        ("dream T=0", "raw scores (earlier default)", dream, dict(rule="entropy", top_p=0.95)),
        ("dream T=0", "nucleus scores (Dream's)", dream,
         dict(rule="entropy", top_p=0.95, sampled=True)),
        ("dream T=0.2", "raw scores (earlier default)", dream,
         dict(rule="entropy", temperature=0.2, top_p=0.95)),
        ("dream T=0.2", "nucleus scores (Dream's)", dream,
         dict(rule="entropy", temperature=0.2, top_p=0.95, sampled=True)),
        ("llada", "low_confidence", llada, {}),
        ("llada", "confidence_eos_eot_inf (exact)", llada, dict(conf_inf=[LLADA_EOS, LLADA_EOT])),
        ("fast-dllm v2", "threshold 0.9", dream, dict(threshold=0.9)),
        ("fast-dllm v2", "sub-blocks of 8, threshold 0.9", dream, dict(threshold=0.9,
                                                                       sub_block=True)),
    ]
    rows, base = [], {}
    for group, name, logits, kw in harness.progress(cases, desc="commit steps"):
        s = _time(_step(logits, **kw), args.repeats)
        base.setdefault(group, s)
        rows.append({"group": group, "setting": name, "rows": args.rows,
                     "vocab": logits.shape[-1], "ms_per_step": s * 1e3,
                     "ratio_to_baseline": s / base[group]})
        print(f"{group:13s} {name:34s} {s * 1e3:9.2f} ms  x{s / base[group]:.2f}")
    path = harness.write_results("bench_exact_samplers", {"device": args.device, "rows": rows},
                                 out=args.out)
    fig, ax = harness.figure(figsize=(8, 4.5))
    labels = [f"{r['group']}\n{r['setting']}" for r in rows]
    ax.barh(range(len(rows)), [r["ms_per_step"] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per commit step ({args.rows} masked positions, {args.device})")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
