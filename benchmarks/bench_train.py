"""`dllm bench train`: training-step throughput of tiny-coder under each speed option, side by side.

    dllm bench train --steps 6 --batch-size 12 --seq-len 384

One real training step (model.diffusion.diffusion_loss forward + backward + AdamW) on batches from
the real example sampler, timed for each option in turn, interleaved round by round so a busy
machine slows every option alike. Options:
- fp32: v1's recipe;
- bf16: torch.autocast(bfloat16) around forward and loss (weights and optimizer stay float32);
- bf16+compile: the same with the network under torch.compile (compile time reported apart).
Reports tokens/s (prompt + response tokens of the batch, as TRAINING.md counts them) and the
ratio to fp32. Results: benchmarks/results/bench_train.json + .png.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import harness


def _batches(n: int, batch_size: int, seq_len: int):
    from model.checkpoint import EMBEDDED_DIR
    from model.data import ExampleSampler, python_corpus
    from model.tokenizer import Tokenizer

    tok = Tokenizer.load(EMBEDDED_DIR)
    files = dict(list(python_corpus().items())[:200])  # enough text for windows; fast to tokenize
    sampler = ExampleSampler(tok, files, seq_len=seq_len, seed=0)
    kinds = ["plain", "fim", "plain", "chat"]
    return [sampler.batch(kinds[i % len(kinds)], batch_size, 32) for i in range(n)]


def main(argv=None) -> None:
    from model.checkpoint import EMBEDDED_DIR, load_checkpoint
    from model.diffusion import diffusion_loss
    from model.train import bf16_native

    p = argparse.ArgumentParser(prog="dllm bench train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per option")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--options", default="fp32,bf16,bf16+compile")
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = args.options.split(",")
    batches = _batches(args.steps + 2, args.batch_size, args.seq_len)

    nets, opts, compile_s = {}, {}, {}
    for opt_name in options:
        net, _, _ = load_checkpoint(EMBEDDED_DIR)
        net.train()
        fwd = net
        if "compile" in opt_name:
            fwd = torch.compile(net)
        nets[opt_name] = (net, fwd)
        opts[opt_name] = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(opt_name: str, b) -> float:
        net, fwd = nets[opt_name]
        bf16 = opt_name.startswith("bf16")
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion_loss(fwd, b.ids, b.prompt_len, b.block_length, loss_mask=b.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opts[opt_name].step()
        opts[opt_name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for opt_name in options:  # warm-up: two steps each (compile happens here)
        compile_s[opt_name] = round(step(opt_name, batches[0]) + step(opt_name, batches[1]), 1)
    times = {o: [] for o in options}
    tokens = []
    for b in harness.progress(batches[2:], desc="train steps", unit="round"):
        tokens.append(int(b.loss_mask.sum()))
        for opt_name in options:
            times[opt_name].append(step(opt_name, b))
    total_tokens = sum(tokens)
    rows = []
    for opt_name in options:
        tok_s = total_tokens / sum(times[opt_name])
        rows.append({"option": opt_name, "tokens_per_s": round(tok_s, 1),
                     "median_step_s": round(statistics.median(times[opt_name]), 3),
                     "warmup_s": compile_s[opt_name]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_first"] = round(r["tokens_per_s"] / base, 3)
    payload = {"rows": rows, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "steps": args.steps, "bf16_native": bf16_native(torch.device("cpu")),
               "threads": torch.get_num_threads()}
    path = harness.write_results("bench_train", payload, out=args.out)
    fig, ax = harness.figure(figsize=(6, 3.5))
    ax.bar([r["option"] for r in rows], [r["tokens_per_s"] for r in rows], color="#4C72B0")
    for i, r in enumerate(rows):
        ax.text(i, r["tokens_per_s"], f"{r['ratio_to_first']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"tiny-coder training step, batch {args.batch_size} x {args.seq_len}")
    harness.save_figure(fig, path)
    for r in rows:
        print(f"{r['option']:>14s} {r['tokens_per_s']:8.0f} tok/s  {r['ratio_to_first']:.2f}x  "
              f"(warm-up {r['warmup_s']} s)")


if __name__ == "__main__":
    main()
