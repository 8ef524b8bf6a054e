"""The entropy-bound commit rule (EB-sampler; `remasking: "entropy_bound"`) on a masked model,
beside the fixed schedule: forward passes per token and FIM quality on held-out Python.

    PYTHONPATH=. python3 -m benchmarks.bench_entropy_bound            # tiny-coder, 60 FIM cases
    PYTHONPATH=. python3 -m benchmarks.bench_entropy_bound --fim-cases 20

Each setting completes the same FIM cases (benchmarks/quality.py's: one held-out line between
256 tokens of context each side, 64 new tokens in blocks of 32, EOS/EoT deferred as the family
default does), the reference sampler (model/sampling.generate), temperature 0. Rows: the fixed
schedule at 32, 8 and 4 steps per block (low_confidence), and the entropy bound at several
bounds with 32 steps as the cap. Reported per row: fim exact match, edit similarity, denoising
passes per generated token; written to benchmarks/results/entropy_bound.json and .png.
The point of the rule: passes follow the model's confidence instead of a schedule, so easy
spans go fast and hard ones slow; the table says what each bound buys on this model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from benchmarks import harness
from benchmarks.quality import edit_similarity, fim_cases
from model.data import python_corpus, split_files
from model.sampling import SamplingParams, generate

log = logging.getLogger("dllm.bench.entropy_bound")

SETTINGS = ([("low_confidence", s, None) for s in (32, 8, 4)]
            + [("entropy_bound", 32, b) for b in (0.01, 0.1, 0.3, 1.0, 3.0)])


def evaluate(net, tok, cfg, cases, remasking: str, steps: int, bound: float | None) -> dict:
    em = sim = 0.0
    passes = tokens = 0
    defer = [t for t in (cfg.eos_id, cfg.eot_id) if t is not None]
    t0 = time.perf_counter()
    for c in harness.progress(cases, desc=f"{remasking} {steps} {bound}", leave=False):
        params = SamplingParams(max_new_tokens=64, steps=steps, block_length=32,
                                remasking=remasking, entropy_bound=bound, defer_token_ids=defer)
        r = generate(net, tok.fim_prompt(c.prefix, c.suffix), params, tokenizer=tok)
        got = r.text.split("\n")[0]
        em += got.rstrip() == c.middle.rstrip()
        sim += edit_similarity(got.rstrip(), c.middle.rstrip())
        passes += r.steps
        tokens += len(r.tokens)
    n = max(1, len(cases))
    return {"remasking": remasking, "steps_per_block": steps, "entropy_bound": bound,
            "fim_exact_match": em / n, "fim_edit_similarity": sim / n,
            "passes_per_token": passes / max(1, tokens), "tokens": tokens, "passes": passes,
            "seconds": time.perf_counter() - t0}


def plot(rows: list[dict], path) -> None:
    fig, ax = harness.figure(figsize=(6, 3.6))
    for rule, marker in (("low_confidence", "s"), ("entropy_bound", "o")):
        pts = [r for r in rows if r["remasking"] == rule]
        ax.plot([r["passes_per_token"] for r in pts], [r["fim_edit_similarity"] for r in pts],
                marker=marker, label=rule)
        for r in pts:
            label = f"{r['steps_per_block']} steps" if rule == "low_confidence" \
                else f"bound {r['entropy_bound']:g}"
            ax.annotate(label, (r["passes_per_token"], r["fim_edit_similarity"]), fontsize=7)
    ax.set_xlabel("denoising passes per token")
    ax.set_ylabel("FIM edit similarity")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-coder")
    p.add_argument("--fim-cases", type=int, default=60)
    args = harness.parse_args(p, argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from model.loaders import load_pretrained

    net, tok, cfg = load_pretrained(args.model, progress=False)
    _, held = split_files(python_corpus(None))
    cases = fim_cases(tok, held, args.fim_cases)
    rows = []
    for rule, steps, bound in SETTINGS:
        rows.append(evaluate(net, tok, cfg, cases, rule, steps, bound))
        log.info("%s", rows[-1])
    out = harness.write_results("entropy_bound", {"model": args.model, "cases": len(cases),
                                                  "rows": rows})
    plot(rows, out)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
