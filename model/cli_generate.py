"""`dllm generate`: complete a prompt (or fill in the middle) from the command line.

    dllm generate --prompt "def fib(n):" --max-tokens 64 --steps 8
    dllm generate --prompt "x = 1\n" --suffix "\nprint(y)\n" --show-steps
    dllm generate --model /models/LLaDA-8B-Instruct --prompt "..." --block-length 32
    dllm generate --model /models/LLaDA-8B-Instruct --prompt "..." --tensor-parallel 2 --device cuda

`--steps` is denoising steps per block. Without sampler flags the model family's published
sampler is used (model/families.py; docs/models.md lists it): Dream's diffusion_generate,
LLaDA's generate, ...; each flag given overrides one setting of it. `--show-steps` redraws the generated region after every
step, masks shown as a shaded block, so you can watch the text appear out of the masks.

One path for every tensor-parallel degree: `complete` builds the prompt, heals its last token,
sets the family's sampling rules and generates; only where the network comes from differs (one
process loads it whole; with --tensor-parallel N each of N processes loads its slice and runs
`complete` in lockstep, and rank 0's answer is printed here), so TP N prints what TP 1 prints.
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.families import family_defaults
from model.healing import heal_prompt
from model.loaders import load_pretrained, resolve_device, torch_dtype
from model.parallel import load_sharded, run_tp
from model.sampling import (
    REMASKING_RULES,
    SCORING_MODES,
    GenerationResult,
    SamplingParams,
    generate,
)
from model.schedule import STEP_SCHEDULES

log = logging.getLogger("dllm.generate")

MASK_GLYPH = "\u2591"  # light shade: a still-masked position in --show-steps frames


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
    # Sampler flags default to None: the model family's published sampler (model/families.py,
    # the table in docs/models.md) fills whatever is not given.
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per block (default: the family's)")
    p.add_argument("--block-length", type=int, default=None, help="default: the family's")
    p.add_argument("--remasking", choices=REMASKING_RULES, default=None)
    p.add_argument("--confidence-threshold", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--step-schedule", choices=STEP_SCHEDULES, default=None,
                   help="commits per step: even (LLaDA) or dream (Dream's time schedule)")
    p.add_argument("--scoring", choices=SCORING_MODES, default=None,
                   help="distribution positions are scored on: raw, nucleus (Dream), drawn")
    p.add_argument("--sub-block-length", type=int, default=None,
                   help="Fast-dLLM v2's sub-block decoding inside each block")
    p.add_argument("--family-option", action="append", default=[], metavar="NAME",
                   help="switch on a published option of the family, e.g. "
                        "confidence_eos_eot_inf or logits_eos_inf (LLaDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--no-cache", action="store_true", help="recompute instead of the KV cache")
    p.add_argument("--show-steps", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="shard the model over N processes (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda if present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


# command-line flag -> SamplingParams field, for the flags that override a family default
_OVERRIDES = {"remasking": "remasking", "confidence_threshold": "confidence_threshold",
              "temperature": "temperature", "top_p": "top_p", "step_schedule": "step_schedule",
              "scoring": "scoring", "sub_block_length": "sub_block_length"}


def sampling_params(args: argparse.Namespace, cfg) -> SamplingParams:
    """The family's published sampler (model/families.py: block, steps, rule, temperature,
    top_p, its exact-sampler settings, suppressed and deferred tokens, as the server uses them)
    with every flag the command line gives over it."""
    fam = family_defaults(cfg).with_options(**{name: True for name in args.family_option})
    kw = fam.sampling_kwargs(args.max_tokens)
    if args.block_length is not None:
        kw["block_length"] = args.block_length
        if args.steps is None:  # the family's steps per block, within the new block
            kw["steps"] = min(fam.steps_per_block or args.block_length, args.block_length)
    if args.steps is not None:
        kw["steps"] = args.steps
    kw |= {fld: getattr(args, flag) for flag, fld in _OVERRIDES.items()
           if getattr(args, flag) is not None}
    return SamplingParams(**kw, seed=args.seed, stop=args.stop,
                          use_cache=not args.no_cache).validate()


def step_printer(args: argparse.Namespace, tok, cfg):
    """on_step for --show-steps (None without it): one frame of the canvas per step."""
    if not args.show_steps:
        return None
    # On a terminal each step redraws the screen; piped output gets one frame per step.
    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""

    def on_step(canvas, info):
        shown = "".join(MASK_GLYPH if t == cfg.mask_id else tok.decode([t]) for t in canvas)
        sys.stdout.write(f"{clear}-- block {info['block']} step {info['step']} "
                         f"(total {info['steps']}) --\n{args.prompt}{shown}\n")
        sys.stdout.flush()

    return on_step


def complete(net, tok, cfg, args: argparse.Namespace,
             on_step=None) -> tuple[GenerationResult, str]:
    """Prompt building, token healing and generation for the parsed command line.

    -> (result, healed): `healed` is the prompt's tail that healing moved into the completion
    (e.g. "\\n" of "class Point:\\n"), which the printed text leaves out."""
    params = sampling_params(args, cfg)
    if family_defaults(cfg).process == "uniform":  # DiffusionGemma: model/uniform.py
        from model.uniform import generate_uniform, uniform_params

        if args.suffix is not None:
            raise SystemExit(f"{cfg.extra.get('family')} does not support fill-in-the-middle")
        prompt_ids, _ = build_prompt(tok, cfg, args.prompt, None)
        return generate_uniform(net, prompt_ids, uniform_params(cfg, params), tokenizer=tok,
                                on_step=on_step), ""
    prompt_ids, suffix_ids = build_prompt(tok, cfg, args.prompt, args.suffix)
    healed = ""
    if args.suffix is None:
        prompt_ids, healed, params.first_token_ids = heal_prompt(tok, prompt_ids)
    result = generate(net, prompt_ids, params, suffix_ids=suffix_ids, tokenizer=tok,
                      on_step=on_step)
    return result, healed


def completion_text(result: GenerationResult, healed: str) -> str:
    """What the user asked for: the completion after the prompt they typed."""
    return result.text[len(healed):] if result.text.startswith(healed) else result.text


def _rank_complete(rank: int, world_size: int, device, args: argparse.Namespace):
    """One rank of `--tensor-parallel N`: its slice of the model, then the same `complete`."""
    net, tok, cfg = load_sharded(args.model, rank, world_size, device=device,
                                 dtype=torch_dtype(args.dtype))
    return complete(net, tok, cfg, args, step_printer(args, tok, cfg) if rank == 0 else None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm generate", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    if args.tensor_parallel > 1:
        result, healed = run_tp(_rank_complete, args.tensor_parallel, args, device=device)
    else:
        net, tok, cfg = load_pretrained(args.model, device=device, dtype=torch_dtype(args.dtype))
        try:
            result, healed = complete(net, tok, cfg, args, step_printer(args, tok, cfg))
        except ValueError as e:
            sys.exit(f"error: {e}")
    if args.show_steps:
        print(f"-- done: {result.steps} steps, finish {result.finish_reason} --")
    print(completion_text(result, healed))


if __name__ == "__main__":
    main()
