"""`dllm train --lora`: fine-tune a LoRA adapter for a served model on a directory of source files.

    dllm train --lora --model tiny-coder --data path/to/package --out runs/lora-pkg --max-steps 300
    dllm train --lora ... --max-steps 600      # same --out: resumes from its checkpoint
    # -> runs/lora-pkg/adapter/ (adapter_config.json + adapter_model.safetensors, PEFT layout),
    #    runs/lora-pkg/train_log.json (held-out loss before training and at every evaluation)

The base model (any checkpoint model/loaders reads, "tiny-coder" by default) stays frozen; a
rank-r update B A is trained on the Linears named by --targets (our module names: wq wk wv wo
w1 w2 w3, or fc proj for GPT-2/DiT blocks) through the same hooks the server applies adapters
with (model/lora.py, the differentiable torch path of kernels/lora.py), with the model's own
training loss (model/diffusion.diffusion_loss: masked diffusion, 1/t weighted, block-diffusion
attention for block-causal models). A is initialised as PEFT does (Kaiming-uniform), B at zero,
so step 0 is the base model exactly.

Data: every .py file under --data (model/data.python_corpus), split by a hash of its path into
train and held-out files (--held-out-percent, at least one file held out); examples are plain
continuations, plus fill-in-the-middle ones when the tokenizer has FIM tokens (tiny-coder). The
held-out loss is measured with fixed noise on fixed batches, before training (the base model's)
and every --eval-every steps, so the log shows what the adapter bought on code it never saw.

Resumable: adapter weights, optimizer, step, RNG states and the log are written atomically to
--out/lora_state.pt every --ckpt-every steps, and the adapter directory with them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from model.data import ExampleSampler, python_corpus
from model.diffusion import diffusion_loss
from model.loaders import load_pretrained
from model.loaders.lora import AdapterWeights, LoRAModule, write_adapter
from model.lora import apply_lora
from model.train import held_out_loss, lr_at

log = logging.getLogger("dllm.train_lora")

STATE_FILE = "lora_state.pt"
ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = "wq,wk,wv,wo,w1,w2,w3"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="store_true", help="(this mode; `dllm train --lora`)")
    p.add_argument("--model", default="tiny-coder", help="base checkpoint directory or preset")
    p.add_argument("--data", required=True, help="directory of .py source files")
    p.add_argument("--out", default="runs/lora", help="run directory (state, adapter, log)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) (rsLoRA)")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help="comma-separated Linear names (the last part of our module names)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    # LoRA takes ~10x a full fine-tune's rate (PEFT's examples use 1e-4..3e-3): only B A moves
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--held-out-percent", type=int, default=15)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--name", default=None, help="the adapter's name (default: --data's folder)")


def split_held_out(files: dict[str, str], percent: int) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) by a stable hash of each path; at least one file on each side."""
    if len(files) < 2:
        raise ValueError(f"need at least two source files to hold one out, found {len(files)}")

    def bucket(key: str) -> int:
        return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100

    held = {k: v for k, v in files.items() if bucket(k) < percent}
    if not held:
        k = min(files, key=bucket)
        held = {k: files[k]}
    if len(held) == len(files):
        k = max(held, key=bucket)
        held.pop(k)
    return {k: v for k, v in files.items() if k not in held}, held


class TrainableLoRA(nn.Module):
    """The trained A [r, in] and B [out, r] of each target, bound into the bank's slot 0 (the
    bank's stacks become these parameters, so the server's hooks train them)."""

    def __init__(self, bank, rank: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = sorted(bank.stacks)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for name in self.names:
            st = bank.stacks[name]
            lin = st.linear
            a = torch.empty(1, rank, lin.in_features)
            bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt 5), as nn.Linear/PEFT
            a.uniform_(-bound, bound, generator=g)
            self.a.append(nn.Parameter(a.to(st.a.device)))
            self.b.append(nn.Parameter(torch.zeros(1, lin.out_features, rank, device=st.b.device)))
            st.a, st.b = self.a[-1], self.b[-1]  # [1, r, in], [1, out, r]: slot 0 only

    def adapter(self, name: str, scale: float) -> AdapterWeights:
        """The trained update as an adapter (B unscaled: the bank trained scale * B)."""
        lora = {n: LoRAModule(a[0].detach().cpu(), (b[0].detach() / scale).cpu(), scale)
                for n, a, b in zip(self.names, self.a, self.b, strict=True)}
        return AdapterWeights(name, None, lora)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_lora(args) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    net, tok, cfg = load_pretrained(args.model)
    for p in net.parameters():
        p.requires_grad_(False)
    targets = {t.strip() for t in args.targets.split(",") if t.strip()}
    bank = apply_lora(net, 1, args.rank, modules=lambda n: n.rsplit(".", 1)[-1] in targets)
    if not bank.stacks:
        raise ValueError(f"no Linear layer of {cfg.name} is named any of {sorted(targets)}")
    lora = TrainableLoRA(bank, args.rank, args.seed)
    scale = args.alpha / (math.sqrt(args.rank) if args.rslora else args.rank)

    files = python_corpus(args.data)
    train_files, held_files = split_held_out(files, args.held_out_percent)
    log.info("%s: %d train files, %d held out (%s)", args.data, len(train_files),
             len(held_files), ", ".join(sorted(held_files)[:5]))
    fim = getattr(tok, "fim_prefix_id", None) is not None
    sampler = ExampleSampler(tok, train_files, seq_len=args.seq_len, seed=args.seed)
    held = ExampleSampler(tok, held_files, seq_len=args.seq_len, seed=1234)
    bl = cfg.block_length
    eval_batches = [held.batch("plain", args.batch_size, bl) for _ in range(args.eval_batches)]

    opt = torch.optim.AdamW(lora.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state_path = out / STATE_FILE
    step, history = 0, []
    rng = random.Random(args.seed)
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st["rank"] != args.rank or st["names"] != lora.names:
            raise ValueError(f"{state_path} was trained with another rank or targets")
        lora.load_state_dict(st["lora"])
        opt.load_state_dict(st["opt"])
        step, history = st["step"], st["history"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        sampler.rng.setstate(st["sampler_rng"])
        log.info("resumed from %s at step %d", state_path, step)
    name = args.name or Path(args.data).resolve().name

    def evaluate() -> float:
        with bank.using(0):
            loss = held_out_loss(net, eval_batches)
        history.append({"step": step, "held_out_loss": loss, "time": time.time()})
        return loss

    def save() -> None:
        _atomic_save({"lora": lora.state_dict(), "opt": opt.state_dict(), "step": step,
                      "history": history, "rng": rng.getstate(), "rank": args.rank,
                      "names": lora.names, "torch_rng": torch.get_rng_state(),
                      "sampler_rng": sampler.rng.getstate()}, state_path)
        write_adapter(out / ADAPTER_DIR, lora.adapter(name, scale), alpha=args.alpha,
                      use_rslora=args.rslora, base_model=str(args.model))
        (out / "train_log.json").write_text(json.dumps(
            {"model": str(args.model), "data": str(args.data), "rank": args.rank,
             "alpha": args.alpha, "targets": sorted(targets), "train_files": len(train_files),
             "held_out_files": sorted(held_files), "history": history}, indent=2) + "\n")

    if not history:
        log.info("held-out loss of the base model: %.4f", evaluate())
    net.train()
    bar = tqdm(total=args.max_steps, initial=step, desc=f"LoRA {name}", unit="step")
    with bank.using(0):
        while step < args.max_steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            kind = "fim" if fim and rng.random() < 0.3 else "plain"
            b = sampler.batch(kind, args.batch_size, bl)
            loss, stats = diffusion_loss(net, b.ids, b.prompt_len, b.block_length,
                                         loss_mask=b.loss_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if step % args.eval_every == 0 or step == args.max_steps:
                net.eval()
                bar.write(f"step {step}: held-out loss {evaluate():.4f}")
                net.train()
            if step % args.ckpt_every == 0 or step == args.max_steps:
                save()
    bar.close()
    net.eval()
    if history[-1]["step"] != step:
        evaluate()
    save()
    first, last = history[0]["held_out_loss"], history[-1]["held_out_loss"]
    log.info("held-out loss %.4f -> %.4f (%+.1f%%); adapter in %s", first, last,
             100 * (last - first) / first, out / ADAPTER_DIR)
    return out / ADAPTER_DIR


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm train --lora", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train_lora(args)


if __name__ == "__main__":
    main()
