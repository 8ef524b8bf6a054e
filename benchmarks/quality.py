"""`dllm eval`: quality of a model against denoising steps, on held-out Python files.

    dllm eval                                  # tiny-coder, 200 FIM + 60 parse cases per setting
    dllm eval --fim-cases 20 --parse-cases 5   # a quick look

Per steps-per-block setting (1, 2, 4, 8, 16, 32 with block length 32) it measures:
- fim_exact_match: one whole held-out line of at most 32 tokens is masked between 256 tokens of
  context on each side (--fim-context); the completion must reproduce the line (trailing
  whitespace ignored);
- fim_edit_similarity: 1 - Levenshtein distance / longer length, averaged over the same cases;
- fim_line_parse_rate: over the cases whose original line is a statement on its own (it parses
  alone, dedented, with `pass` after a trailing colon), how often the completed line is one too.
  With exact matches near 0, edit similarity scores a wrong but well-formed line
  (`def __init__(self, key: str) -> bool:`) like token salad (`def __(self,,`): this column
  tells them apart;
- parse_rate: a held-out function's header (its def line and docstring) is completed; the
  completion, cut where the function's indentation ends, replaces the original body and the whole
  file must still parse with `ast` (an empty completion counts as a failure);
- pass_rate: a held-out function of the whole training corpus that has a doctest or an obvious
  call (benchmarks/exec_cases.py: a call with literal arguments somewhere in the corpus or the
  standard library's tests, or `f()` when every parameter has a default) is completed from its
  header and run in a child interpreter (per-case alarm, memory limit): its doctest must pass,
  or every call must return what the original returns. Cases are validated so that the
  original body passes and no trivial body does.
FIM and parse cases come from the standard library's held-out files, as in every earlier run.
Writes benchmarks/results/quality.json (`rows`, one per setting, plus an autoregressive baseline:
block 1, one step) and quality.png.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness
from model.data import python_corpus, split_files
from model.healing import heal_prompt
from model.sampling import SamplingParams, generate

log = logging.getLogger("dllm.eval")

STEPS = (1, 2, 4, 8, 16, 32)

# The five prompts TRAINING.md shows, with each version's completion (`dllm eval --showcase`).
SHOWCASE_PROMPTS = (
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def read_json(path):\n    with open(path) as f:\n",
    "    for i, line in enumerate(lines):\n        if not line.strip():\n",
)


@dataclass
class FimCase:
    prefix: str
    middle: str
    suffix: str


@dataclass
class ParseCase:
    before: str  # file text up to and including the header
    after: str  # file text after the original function
    indent: int  # the def line's indentation


def fim_cases(tok, files: dict[str, str], n: int, context: int = 256, max_middle: int = 32,
              seed: int = 0) -> list[FimCase]:
    rng = random.Random(seed)
    names = sorted(files)
    cases: list[FimCase] = []
    attempts = 0
    while len(cases) < n and attempts < n * 50:
        attempts += 1
        text = files[rng.choice(names)]
        lines = text.splitlines(keepends=True)
        if len(lines) < 10:
            continue
        i = rng.randrange(2, len(lines) - 2)
        line = lines[i]
        if not line.strip() or len(tok.encode(line)) > max_middle:
            continue
        prefix, suffix = "".join(lines[:i]), "".join(lines[i + 1:])
        # keep 256 tokens each side, cut on the token grid the model sees
        pre_ids, suf_ids = tok.encode(prefix[-context * 8:]), tok.encode(suffix[:context * 8])
        if len(pre_ids) < context // 4:
            continue
        cases.append(FimCase(tok.decode(pre_ids[-context:]), line, tok.decode(suf_ids[:context])))
    return cases


def parse_cases(files: dict[str, str], n: int, seed: int = 0) -> list[ParseCase]:
    rng = random.Random(seed)
    out: list[ParseCase] = []
    for name in sorted(files):
        text = files[name]
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.body or node.end_lineno is None:
                continue
            body = node.body
            doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str)
            first = body[1] if doc and len(body) > 1 else (None if doc else body[0])
            if first is None or first.lineno <= node.lineno:
                continue
            head_end = first.lineno - 1  # lines before the first real statement
            out.append(ParseCase("".join(lines[:head_end]), "".join(lines[node.end_lineno:]),
                                 node.col_offset))
    rng.shuffle(out)
    return out[:n]


def edit_similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def cut_function_body(completion: str, indent: int) -> str:
    """Keep the completion while it stays indented deeper than the def line."""
    kept = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and (len(line) - len(line.lstrip())) <= indent:
            break
        kept.append(line)
    body = "".join(kept)
    return body if body.endswith("\n") else body + "\n"


def line_parses(line: str) -> bool:
    """Whether one line is a statement on its own: dedented, and a block header (`if x:`)
    given a `pass` body."""
    s = line.strip()
    if not s or s.startswith("#"):
        return False
    return parses(s + " pass" if s.endswith(":") else s)


def parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def complete_body(net, tok, before: str, indent: int, params_kw: dict, prompt_tokens: int,
                  max_new_tokens: int) -> str:
    """The model's continuation of a function header (healed as the server heals it), cut where
    the function's indentation ends."""
    ids, healed, allowed = heal_prompt(tok, tok.encode(before)[-prompt_tokens:])
    params = SamplingParams(max_new_tokens=max_new_tokens, first_token_ids=allowed, **params_kw)
    text = generate(net, ids, params, tokenizer=tok).text
    text = text[len(healed):] if text.startswith(healed) else text
    return cut_function_body(text, indent)


def evaluate(net, tok, cfg, fims, parses_, steps: int, block_length: int,
             prompt_tokens: int = 320, parse_tokens: int = 64, defer: list[int] | None = None,
             execs: list | None = None, exec_tokens: int = 128) -> dict:
    em = sim = 0.0
    lines_ok = lines_total = 0
    for c in harness.progress(fims, desc=f"fim  spb={steps:>2}", leave=False):
        params = SamplingParams(max_new_tokens=64, steps=steps, block_length=block_length,
                                defer_token_ids=list(defer or []))
        if cfg.attention == "block_causal":
            r = generate(net, tok.fim_prompt(c.prefix, c.suffix), params, tokenizer=tok)
        else:
            r = generate(net, tok.encode(c.prefix), params, suffix_ids=tok.encode(c.suffix),
                         tokenizer=tok)
        got = r.text.split("\n")[0]  # the middle is one line: score the first line produced
        em += got.rstrip() == c.middle.rstrip()
        sim += edit_similarity(got.rstrip(), c.middle.rstrip())
        if line_parses(c.middle):
            lines_total += 1
            lines_ok += line_parses(got)
    ok = 0
    kw = dict(steps=steps, block_length=block_length, defer_token_ids=list(defer or []))
    for c in harness.progress(parses_, desc=f"parse spb={steps:>2}", leave=False):
        # the header ends in a newline: heal it as the server does (model/healing.py)
        body = complete_body(net, tok, c.before, c.indent, kw, prompt_tokens, parse_tokens)
        # an empty body would leave a docstring-only function, which parses: count it as a miss
        ok += bool(body.strip()) and parses(c.before + body + c.after)
    out = {"fim_exact_match": em / max(1, len(fims)),
           "fim_edit_similarity": sim / max(1, len(fims)),
           "fim_line_parse_rate": lines_ok / max(1, lines_total), "fim_statement_cases": lines_total,
           "parse_rate": ok / max(1, len(parses_)),
           "fim_cases": len(fims), "parse_cases": len(parses_)}
    if execs:
        from benchmarks.exec_cases import run_cases

        bodies = [complete_body(net, tok, c.before, c.indent, kw, prompt_tokens, exec_tokens)
                  for c in harness.progress(execs, desc=f"exec spb={steps:>2}", leave=False)]
        passed = run_cases(execs, bodies)
        out.update(pass_rate=sum(passed) / len(execs), exec_cases=len(execs))
    return out


def plot(rows: list[dict], baseline: dict | None, path: Path, title: str) -> None:
    fig, ax = harness.figure(figsize=(7, 4.5))
    x = [r["steps_per_block"] for r in rows]
    for key, label in [("fim_exact_match", "FIM exact match"),
                       ("fim_edit_similarity", "FIM edit similarity"),
                       ("fim_line_parse_rate", "FIM line parses"),
                       ("parse_rate", "parse rate"),
                       ("pass_rate", "executed pass rate")]:
        if key not in rows[0]:
            continue
        line, = ax.plot(x, [r[key] for r in rows], marker="o", label=label)
        if baseline and key in baseline:
            ax.axhline(baseline[key], color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("denoising steps per block (block length 32); dotted: autoregressive")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    harness.save_figure(fig, path)


def showcase(net, tok, args) -> None:
    rows = []
    for prompt in SHOWCASE_PROMPTS:
        ids, healed, allowed = heal_prompt(tok, tok.encode(prompt))
        params = SamplingParams(max_new_tokens=64, steps=32, block_length=32,
                                first_token_ids=allowed)
        text = generate(net, ids, params, tokenizer=tok).text
        rows.append({"prompt": prompt, "completion": text[len(healed):] if text.startswith(healed)
                     else text})
        print(f"--- {prompt!r}\n{prompt}{rows[-1]['completion']}")
    harness.write_results("showcase", {"model": args.model, "rows": rows},
                          args.out or harness.result_path("showcase"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-coder")
    p.add_argument("--fim-cases", type=int, default=200)
    p.add_argument("--fim-context", type=int, default=256,
                   help="tokens of context kept on each side of a FIM line")
    p.add_argument("--parse-cases", type=int, default=60)
    p.add_argument("--exec-cases", type=int, default=60,
                   help="held-out functions (doctested or called) to complete and run (0: skip)")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true", help="skip the autoregressive row")
    p.add_argument("--showcase", action="store_true",
                   help="only complete SHOWCASE_PROMPTS (64 tokens, block 32, 32 steps/block, "
                        "temperature 0) and write results/showcase.json")
    p.add_argument("--out", default=None, help="JSON path (default results/quality.json)")
    p.add_argument("--corpus", default=None, help="folder of .py files (default: the stdlib)")
    p.add_argument("--defer-eos", action="store_true",
                   help="commit EOS/end-of-turn last (LLaDA's confidence_eos_eot_inf): without it, "
                        "one token per step fills blocks with EOS from the end (see quality.json)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from model.loaders import load_pretrained

    net, tok, cfg = load_pretrained(args.model, progress=False)
    if args.showcase:
        showcase(net, tok, args)
        return
    _, held = split_files(python_corpus(args.corpus))
    fims = fim_cases(tok, held, args.fim_cases, context=args.fim_context)
    pcs = parse_cases(held, args.parse_cases)
    execs = []
    if args.exec_cases:
        from benchmarks.exec_cases import exec_cases, stdlib_test_sources
        from model.corpus import code_corpus

        # with --corpus every case comes from that folder; else from the training corpus, with
        # the standard library's own tests (never trained on) as further call sites
        every = python_corpus(args.corpus) if args.corpus else code_corpus()[0]
        _, held_all = split_files(every)
        execs = exec_cases(held_all, args.exec_cases, call_sources=every if args.corpus
                           else {**every, **stdlib_test_sources()})
    log.info("%d held-out files: %d FIM cases, %d parse cases, %d executed cases", len(held),
             len(fims), len(pcs), len(execs))
    rows = []
    t0 = time.time()
    defer = [t for t in (cfg.eos_id, cfg.eot_id) if t is not None] if args.defer_eos else None
    for s in args.steps:
        row = {"steps_per_block": s, "block_length": args.block_length,
               **evaluate(net, tok, cfg, fims, pcs, s, args.block_length, defer=defer,
                          execs=execs)}
        log.info("%s", row)
        rows.append(row)
    baseline = None
    if not args.no_baseline:
        baseline = {"steps_per_block": 1, "block_length": 1,
                    **evaluate(net, tok, cfg, fims, pcs, 1, 1, defer=defer, execs=execs)}
        log.info("autoregressive: %s", baseline)
    result = {"model": args.model, "defer_eos": args.defer_eos, "fim_context": args.fim_context,
              "rows": rows,
              "autoregressive": baseline,
              "exec_cases": [{"key": c.key, "function": c.qualname,
                              "check": "calls" if c.calls else "doctest", "calls": c.calls}
                             for c in execs],
              "wall_s": round(time.time() - t0, 1),
              "notes": "held-out = stdlib files whose path hash falls in the 3% split"}
    out = harness.write_results("quality", result, args.out)
    plot(rows, baseline, out, f"{args.model}: quality vs denoising steps")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
