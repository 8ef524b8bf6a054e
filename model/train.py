"""`dllm train`: train a diffusion LM from scratch on Python source, resumably.

    dllm train --out runs/tiny-coder --max-steps 2000            # CPU, resumes if runs/ holds a ckpt
    dllm train --export model/weights/tiny-coder                  # also writes the shipped format
    deepspeed --num_gpus 8 -m model.train --deepspeed --device cuda   # ZeRO-2 on GPUs

The corpus defaults to the standard library of the running interpreter plus the permissively
licensed pure-Python packages installed beside it (model/corpus.py: licences, skips, de-duplication),
split train/held-out by a hash of each file's key; `--corpus stdlib` is the standard library alone
(without its tests), `--corpus DIR` a folder of .py files taken whole. The held-out loss is measured
with fixed noise on v1's held-out set (the standard library's held-out files, tests included), so
runs on different corpora compare, and on this corpus's own held-out files. Each step draws one
kind of batch (plain / FIM / chat, see model/data.py) and one block length (mostly 32, some shorter, some 1 = autoregressive so the in-house AR baseline
runs on weights that were trained for it). Checkpoints (model, optimizer, step, RNG) are written
atomically every --ckpt-every steps; held-out loss on fixed batches every --eval-every steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.corpus import code_corpus
from model.data import ExampleSampler, python_corpus, split_files
from model.diffusion import diffusion_loss
from model.tokenizer import Tokenizer
from model.transformer import DiffusionTransformer

log = logging.getLogger("dllm.train")

KIND_WEIGHTS = {"plain": 0.6, "fim": 0.3, "chat": 0.1}
# Block length 32 is what serving uses by default; shorter blocks keep the model usable at other
# settings, and block 1 trains the autoregressive baseline the benchmarks compare against.
BLOCK_WEIGHTS = {32: 0.55, 16: 0.1, 8: 0.1, 4: 0.1, 1: 0.15}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/tiny-coder", help="run directory (checkpoints, logs)")
    p.add_argument("--export", default=None, help="also write the shipped format here")
    p.add_argument("--init-from", default=None,
                   help="start from an exported checkpoint's weights and tokenizer (a fresh "
                        "optimizer): continue training the shipped model in a later session")
    p.add_argument("--preset", default="tiny-coder")
    p.add_argument("--corpus", default="packages",
                   help="'packages' (stdlib + permissive installed packages), 'stdlib', or a folder of .py files")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast precision of the forward/backward (weights and optimizer stay "
                        "float32); auto = bf16 where the device computes it natively")
    p.add_argument("--deepspeed", action="store_true", help="use DeepSpeed ZeRO (GPU launcher)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%


def _get_tokenizer(out: Path, train_files: dict[str, str], vocab_size: int,
                   init_from: str | None = None) -> Tokenizer:
    if (out / "tokenizer.json").exists():
        return Tokenizer.load(out)
    if init_from:
        tok = Tokenizer.load(init_from)
        tok.save(out)
        return tok
    log.info("training tokenizer (%d files)", len(train_files))
    tok = Tokenizer.train(train_files.values(), vocab_size=vocab_size)
    tok.save(out)
    return tok


@torch.no_grad()
def held_out_loss(net, batches) -> float:
    net.eval()
    g = torch.Generator().manual_seed(1234)  # same noise every evaluation: comparable numbers
    total, n = 0.0, 0
    for b in batches:
        dev = next(net.parameters()).device
        loss, st = diffusion_loss(net, b.ids.to(dev), b.prompt_len.to(dev), b.block_length,
                                  generator=g if dev.type == "cpu" else None,
                                  loss_mask=b.loss_mask.to(dev))
        total += float(loss) * st["response_tokens"]
        n += st["response_tokens"]
    net.train()
    return total / max(n, 1)


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (CUDA, or a CPU with AVX512-BF16/AMX, through oneDNN):
    elsewhere autocast would emulate them, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() \
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, precision: str):
    """The autocast context of a training step. bf16 autocast measured 1.44x the float32 step on
    tiny-coder (2-core AMD EPYC with AVX512-BF16; benchmarks/results/bench_train.json)."""
    on = precision == "bf16" or (precision == "auto" and bf16_native(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def load_corpus(spec: str | None) -> tuple[dict[str, str], list]:
    """-> (files, CorpusSource records). 'packages' and 'stdlib' skip tests and generated files
    (model/corpus.py); a folder is taken whole."""
    if spec in (None, "packages"):
        return code_corpus(packages=True)
    if spec == "stdlib":
        return code_corpus(packages=False)
    return python_corpus(spec), []


def eval_sets(held_files: dict[str, str]) -> dict[str, dict[str, str]]:
    """The held-out sets the loss is reported on: "v1" = the whole standard library's held-out
    files (tests included: 33 of its 56 files), the set every run since v1 is measured on, so
    numbers compare across corpora; "code" = this corpus's held-out files (no tests)."""
    _, v1 = split_files(python_corpus())
    return {"v1": v1, "code": held_files}


def train(args) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(args.seed + rank)
    files, sources = load_corpus(args.corpus)
    train_files, held_files = split_files(files)
    log.info("corpus: %d train files, %d held-out files (%d sources)", len(train_files),
             len(held_files), len(sources))
    if rank == 0 and sources:
        (out / "corpus.json").write_text(json.dumps([vars(s) for s in sources], indent=1))
    preset = ModelConfig.from_name(args.preset)
    tok = _get_tokenizer(out, train_files, preset.vocab_size, args.init_from)
    cfg = ModelConfig.from_dict({**preset.to_dict(), "vocab_size": tok.vocab_size,
                                 "mask_id": tok.mask_id, "eos_id": tok.eos_id,
                                 "pad_id": tok.pad_id, "eot_id": tok.eot_id})
    device = torch.device(args.device)
    net = DiffusionTransformer(cfg).to(device)
    log.info("model: %.2fM parameters", net.num_params() / 1e6)
    opt = _optimizer(net, args)
    ckpt = out / "ckpt.pt"
    state = _restore(net, opt, cfg, args, ckpt, device)
    engine = None
    if args.deepspeed:
        engine, opt = _deepspeed(net, opt, args, device)
        net = engine.module

    sampler = ExampleSampler(tok, train_files, seq_len=args.seq_len, seed=args.seed + rank + state["step"])
    eval_batches = {}
    for name, held_set in eval_sets(held_files).items():
        held = ExampleSampler(tok, held_set, seq_len=args.seq_len, seed=999)
        eval_batches[name] = [held.batch(k, args.batch_size, 32)
                              for k in ("plain", "fim")[: max(1, args.eval_batches)]
                              for _ in range(max(1, args.eval_batches // 2))]
    rng = random.Random(args.seed + rank + state["step"])
    metrics = (out / "log.jsonl").open("a")
    bar = tqdm(total=args.max_steps, initial=state["step"], desc="train", unit="step",
               disable=rank != 0)
    net.train()
    t_last = time.time()
    while state["step"] < args.max_steps:
        step = state["step"]
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        bl = rng.choices(list(BLOCK_WEIGHTS), weights=list(BLOCK_WEIGHTS.values()))[0]
        b = sampler.batch(kind, args.batch_size, bl)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with autocast(device, args.precision):
            loss, st = diffusion_loss(net, b.ids.to(device), b.prompt_len.to(device), bl,
                                      loss_mask=b.loss_mask.to(device))
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        now = time.time()
        state["wall_s"] += now - t_last
        t_last = now
        state["step"] += 1
        state["tokens"] += int(b.loss_mask.sum())
        bar.update(1)
        bar.set_postfix(loss=f"{st['loss']:.3f}", kind=kind, bl=bl)
        row = {"step": state["step"], "kind": kind, "block_length": bl, **st,
               "lr": lr_at(step, args), "tokens": state["tokens"], "wall_s": round(state["wall_s"], 1)}
        if state["step"] % args.eval_every == 0 or state["step"] == args.max_steps:
            row["held_out_loss"] = held_out_loss(net, eval_batches["v1"])
            row["held_out_loss_code"] = held_out_loss(net, eval_batches["code"])
            log.info("step %d held-out loss %.4f (v1 set), %.4f (code set) (%d tokens, %.0f s)",
                     state["step"], row["held_out_loss"], row["held_out_loss_code"],
                     state["tokens"], state["wall_s"])
            state["held_out_loss"] = row["held_out_loss"]
            state["held_out_loss_code"] = row["held_out_loss_code"]
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if rank == 0 and (state["step"] % args.ckpt_every == 0 or state["step"] == args.max_steps):
            _save(net, opt, tok, cfg, state, ckpt, args.export)
    bar.close()
    return out


def _optimizer(net: DiffusionTransformer, args) -> torch.optim.Optimizer:
    """AdamW; matrices decay, embeddings, norms and biases do not (GPT-2 / nanoGPT practice)."""
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2 or "embeddings" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95))


def _restore(net, opt, cfg: ModelConfig, args, ckpt: Path, device) -> dict:
    """Resume from `ckpt` (weights, optimizer, counters, RNG states) when it exists, else start
    from --init-from's weights if given. -> the training counters."""
    state = {"step": 0, "tokens": 0, "wall_s": 0.0}
    if args.init_from and not ckpt.exists():
        init, _, init_cfg = load_checkpoint(args.init_from, device=device)
        if init_cfg.to_dict() != cfg.to_dict():
            raise ValueError(f"--init-from config differs from preset {args.preset!r}")
        net.load_state_dict(init.state_dict())
        log.info("initialised from %s", args.init_from)
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        random.setstate(saved["py_rng"])
        torch.set_rng_state(saved["torch_rng"])
        log.info("resumed from %s at step %d (%d tokens seen)", ckpt, state["step"], state["tokens"])
    return state


def _deepspeed(net, opt, args, device):
    """-> (DeepSpeed engine, its optimizer) for GPU launches under ZeRO stage --zero-stage."""
    import deepspeed  # only on GPU launches

    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": device.type == "cuda"},
    }
    engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config)
    return engine, opt


def _save(net, opt, tok, cfg: ModelConfig, state: dict, ckpt: Path, export: str | None) -> None:
    """The resumable checkpoint (written to a temporary name, then renamed, so a kill mid-write
    leaves the previous one), and with --export the servable model directory."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "state": state,
                "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                "config": cfg.to_dict()}, tmp)
    tmp.replace(ckpt)
    if export:
        save_checkpoint(export, net, tok)
        (Path(export) / "train_state.json").write_text(json.dumps(state, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm train", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
