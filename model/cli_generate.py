"""`dllm generate`: complete a prompt (or fill in the middle) from the command line.

    dllm generate --prompt "def fib(n):" --max-tokens 64 --steps 8
    dllm generate --prompt "x = 1\n" --suffix "\nprint(y)\n" --show-steps
    dllm generate --model /models/LLaDA-8B-Instruct --prompt "..." --block-length 32

`--steps` is denoising steps per block. `--show-steps` redraws the generated region after every
step, masks shown as a shaded block, so you can watch the text appear out of the masks.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from model.healing import heal_prompt
from model.sampling import REMASKING_RULES, SamplingParams, generate

log = logging.getLogger("dllm.generate")


def load_model(name_or_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A preset name ("tiny-coder") or a checkpoint directory -> (net, tokenizer, cfg)."""
    from model.loaders import load_pretrained  # every format, ours included

    return load_pretrained(name_or_dir, device=device, dtype=dtype)


def build_prompt(tokenizer, cfg, prompt: str, suffix: str | None):
    """-> (prompt_ids, suffix_ids). Block-causal models read FIM from the prompt (PSM format they
    were trained on); full-attention models take the suffix after the canvas."""
    if suffix is None:
        return tokenizer.completion_prompt(prompt), None
    if cfg.attention == "block_causal":
        return tokenizer.fim_prompt(prompt, suffix), None
    return tokenizer.completion_prompt(prompt), tokenizer.encode(suffix)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--suffix", default=None, help="fill in the middle between prompt and suffix")
    p.add_argument("--model", default="tiny-coder", help="preset name or checkpoint directory")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block")
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--remasking", choices=REMASKING_RULES, default="low_confidence")
    p.add_argument("--confidence-threshold", type=float, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--no-cache", action="store_true", help="recompute instead of the KV cache")
    p.add_argument("--show-steps", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="shard the model over N processes (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--device", default="cpu")


def family_tokens(params: SamplingParams, cfg) -> SamplingParams:
    """The family's suppressed and deferred tokens (model/families.py), as the server uses."""
    from model.families import family_defaults

    fam = family_defaults(cfg)
    params.suppress_token_ids = list(fam.suppress_token_ids)
    params.defer_token_ids = list(fam.defer_token_ids)
    return params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm generate", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tensor_parallel > 1:
        from model.parallel import tp_generate_cli

        tp_generate_cli(args)
        return
    net, tok, cfg = load_model(args.model, device=args.device)
    params = SamplingParams(
        max_new_tokens=args.max_tokens, steps=args.steps or cfg.default_steps_per_block,
        block_length=args.block_length or cfg.block_length, remasking=args.remasking,
        confidence_threshold=args.confidence_threshold, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, stop=args.stop, use_cache=not args.no_cache)
    family_tokens(params, cfg)
    prompt_ids, suffix_ids = build_prompt(tok, cfg, args.prompt, args.suffix)
    healed = ""
    if args.suffix is None:
        prompt_ids, healed, params.first_token_ids = heal_prompt(tok, prompt_ids)
    on_step = None
    if args.show_steps:
        # On a terminal each step redraws the screen; piped output gets one frame per step.
        clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""

        def on_step(canvas, info):
            shown = "".join("\u2591" if t == cfg.mask_id else tok.decode([t]) for t in canvas)
            sys.stdout.write(f"{clear}-- block {info['block']} step {info['step']} "
                             f"(total {info['steps']}) --\n{args.prompt}{shown}\n")
            sys.stdout.flush()
    try:
        result = generate(net, prompt_ids, params, suffix_ids=suffix_ids, tokenizer=tok,
                          on_step=on_step)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.show_steps:
        print(f"-- done: {result.steps} steps, finish {result.finish_reason} --")
    print(result.text[len(healed):] if result.text.startswith(healed) else result.text)


if __name__ == "__main__":
    main()
