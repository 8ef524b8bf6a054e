"""Reference sampler: block-by-block denoising of a canvas of masks.

    params = SamplingParams(max_new_tokens=128, steps=8, block_length=32)
    result = generate(net, prompt_ids, params)            # -> GenerationResult(tokens, ...)

The canvas is `max_new_tokens` masks cut into blocks of `block_length`. Each block is denoised in
`steps` forward passes (steps *per block*); every step predicts all masked positions of the block
at once and a commit rule decides which predictions become final:
- low_confidence: the k most probable predictions (LLaDA), margin: largest top1-top2 gap,
  entropy: lowest entropy (Dream), random: k random positions;
- confidence_threshold: every prediction above the threshold, at least one (Fast-dLLM); `steps`
  becomes a cap, and the last allowed step commits whatever is left.
k follows an even split of the block over its steps (LLaDA's schedule). With temperature > 0 the
predictions are Gumbel-max samples keyed by (seed, position, step), so a seed fixes the output.

Layouts: block-causal models keep an exact KV cache of the prompt and finished blocks
(model/cache.py) and run only the active block; `use_cache=False` recomputes everything with the
block-causal mask (same logits, the cache's test). Full-attention models (LLaDA, Dream) run the
whole canvas every step, with a fill-in-the-middle suffix after it when given.
Block length 1 with one step is autoregressive decoding on the same weights.

Full-attention models may instead keep Fast-dLLM's approximate cache (`full_cache`). With
P = prompt, L = P + canvas + suffix tokens and the active block at canvas [lo, hi):
- the first step of every block (the *refresh*) is the uncached forward over all L tokens
  (bit-identical logits) and also stores every position's K/V;
- "prefix": each later step of the block recomputes positions q0 .. L-1 (the block, the rest of
  the canvas, the suffix), attending to the refresh's K/V of [0, q0) and to its own fresh K/V;
- "dual": each later step recomputes only q0 .. P+hi-1 (the block), attending to the refresh's
  K/V of [0, q0) and [P+hi, L) and to its own.
q0 = P + lo, or P + lo - 1 for models with shifted logits (Dream: hidden state i-1 predicts token
i, so the token before the block is recomputed too). The refresh-time K/V do not see the block's
later commits: that staleness is the approximation (`cached_query_span` says which positions a
cached step runs; the engine uses the same). Forwards per block are the same as without the
cache; a cached one runs L - q0 (prefix) or P + hi - q0 (dual) tokens instead of L.
Time-conditioned full models feed t (the whole canvas's masked fraction) to every forward.
Block-causal models ignore `full_cache`: their cache is already exact.

`commit_step` is the per-step rule for a batch of rows with their own settings; the engine calls
it too, which is what makes the engine's tokens equal this reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.commit_select import commit_candidates
from kernels.noise import position_noise
from model.cache import KVCache
from model.config import ModelConfig
from model.diffusion import block_causal_mask, segment_ids
from model.transformer import DenseAttention

REMASKING_RULES = ("low_confidence", "margin", "entropy", "random")
FULL_CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    steps: int = 8  # denoising steps per block; capped at block_length
    block_length: int = 32
    remasking: str = "low_confidence"
    confidence_threshold: float | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # default: the model's EOS (and end-of-turn)
    suppress_token_ids: list[int] = field(default_factory=list)  # never predicted (LLaDA EOS/EoT)
    # Predictions of these tokens are committed last (LLaDA's confidence_eos_eot_inf): they still
    # fill a position when nothing else is left, but never win a step on confidence alone.
    defer_token_ids: list[int] = field(default_factory=list)
    # Token healing (model/healing.py): the first generated token must be one of these.
    first_token_ids: list[int] | None = None
    use_cache: bool = True
    # Write a finished block's K/V in the same forward as the next block's first step (exact
    # up to float rounding; saves one pass per block, half the passes at block length 1).
    fused_commit: bool = False
    # Full-attention models: Fast-dLLM's approximate KV cache, "none" | "prefix" | "dual" (see
    # the module docstring). "none" by default: cached steps attend to K/V that are stale by
    # the block's own commits, so tokens may differ from the uncached sampler's.
    full_cache: str = "none"

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.block_length < 1:
            raise ValueError("block_length must be >= 1")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {self.remasking!r}")
        if self.confidence_threshold is not None and not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError("confidence_threshold must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.full_cache not in FULL_CACHE_MODES:
            raise ValueError(f"full_cache must be one of {FULL_CACHE_MODES}, "
                             f"got {self.full_cache!r}")
        return self

    def steps_for(self, block_len: int) -> int:
        return min(self.steps, block_len)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens, truncated after the first stop token
    finish_reason: str  # "stop" (stop token or string) or "length"
    steps: int  # denoising forward passes spent (cache writes not counted)
    blocks: int
    text: str | None = None  # when a tokenizer was given: decoded, cut before a stop string


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Even split of n_masked commits over `steps` steps, earlier steps taking the remainder."""
    steps = max(1, min(steps, n_masked)) if n_masked else 1
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def commit_step(logits: torch.Tensor, block: torch.Tensor, positions: torch.Tensor,
                step_idx: torch.Tensor, n_commit: torch.Tensor, *, mask_id: int,
                rules: list[str], temperature: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, threshold: torch.Tensor,
                last_step: torch.Tensor,
                defer_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step's commit for B rows.

    logits [B, Lb, V]; block [B, Lb] current tokens (mask_id where still masked; rows may be
    padded with non-mask tokens); positions [B, Lb] absolute positions (key the noise);
    step_idx [B] step within the block; n_commit [B] scheduled commits; threshold [B] (NaN = off);
    last_step [B] bool (commit everything left); defer_ids: per row, tokens ranked last.
    Returns (new block [B, Lb], committed [B, Lb]).
    """
    B, Lb, V = logits.shape
    masked = block == mask_id
    flat = lambda x: x[:, None].expand(B, Lb).reshape(-1)  # noqa: E731 - per-row -> per-position
    cand = commit_candidates(logits.reshape(B * Lb, V), flat(temperature), flat(top_p),
                             flat(seeds), positions.reshape(-1), flat(step_idx))
    tokens = cand.tokens.view(B, Lb)
    scores = torch.empty(B, Lb, device=logits.device)
    uniform = len(set(rules)) == 1  # the common case: no per-row mask, no host-to-device copy
    for rule in set(rules):
        if rule == "low_confidence":
            s = cand.confidence
        elif rule == "margin":
            s = cand.margin
        elif rule == "entropy":
            s = -cand.entropy
        else:  # random
            s = position_noise(flat(seeds), positions.reshape(-1), flat(step_idx))
        if uniform:
            scores = s.view(B, Lb).float()
        else:
            rows = torch.tensor([r == rule for r in rules], device=logits.device)
            scores = torch.where(rows[:, None], s.view(B, Lb).float(), scores)
    if defer_ids is not None and any(defer_ids):
        # scores live in [-log V, 1]: shifting by 1e4 ranks deferred predictions below all others
        for row, ids in enumerate(defer_ids):
            if ids:
                hit = torch.isin(tokens[row], torch.tensor(ids, device=tokens.device))
                scores[row] = torch.where(hit, scores[row] - 1e4, scores[row])
    scores = scores.masked_fill(~masked, float("-inf"))
    # k per row: the schedule, or everything above the threshold (at least 1), or all at the end
    conf = cand.confidence.view(B, Lb).masked_fill(~masked, -1.0)
    use_thr = ~torch.isnan(threshold)
    above = (conf > threshold.nan_to_num(2.0)[:, None]).sum(1)
    k = torch.where(use_thr, above.clamp_min(1), n_commit)
    k = torch.where(last_step, masked.sum(1), k).clamp(max=Lb)
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(Lb, device=order.device).expand(B, Lb))
    committed = (rank < k[:, None]) & masked
    return torch.where(committed, tokens, block), committed


def cached_query_span(mode: str, prompt_len: int, lo: int, hi: int, total: int,
                      logit_shift: bool) -> tuple[int, int]:
    """[q0, q1): the positions a cached step of a full-attention model recomputes (module
    docstring), for the block at canvas [lo, hi) of a sequence of `total` tokens. The cache's
    copies of these positions are hidden from it; every other cached position is attended."""
    start = prompt_len + lo
    q0 = start - 1 if logit_shift and start > 0 else start
    q1 = total if mode == "prefix" else prompt_len + hi
    return q0, q1


def _prepare_logits(logits: torch.Tensor, cfg: ModelConfig, suppress: list[int]) -> torch.Tensor:
    # The mask token is never a prediction; PAD only where it is not also EOS (LLaDA, Dream).
    banned = [cfg.mask_id] + list(suppress)
    if cfg.pad_id is not None and cfg.pad_id != cfg.eos_id:
        banned.append(cfg.pad_id)
    logits = logits.clone()
    logits[..., [b for b in banned if b < logits.shape[-1]]] = float("-inf")
    return logits


def constrain_first_position(logits: torch.Tensor, allowed: list[int]) -> None:
    """In place: only `allowed` tokens at the first position of the block (logits [B, Lb, V])."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.tensor(allowed, device=logits.device)] = True
    logits[:, 0].masked_fill_(~keep, float("-inf"))


def _first_stop(tokens: list[int], stop_ids: set[int]) -> int | None:
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return i
    return None


@torch.no_grad()
def generate(net: torch.nn.Module, prompt_ids: list[int], params: SamplingParams, *,
             suffix_ids: list[int] | None = None, tokenizer=None,
             on_step: Callable[[list[int], dict], None] | None = None) -> GenerationResult:
    """Denoise `params.max_new_tokens` tokens after `prompt_ids` (see the module docstring).

    suffix_ids: fill-in-the-middle for full-attention models (the suffix follows the canvas);
    block-causal models take FIM in the prompt (Tokenizer.fim_prompt). on_step(canvas, info) sees
    the generated region (masks included) after every step."""
    params.validate()
    cfg: ModelConfig = net.cfg
    device = next(net.parameters()).device
    if suffix_ids and cfg.attention == "block_causal":
        raise ValueError("block-causal models take fill-in-the-middle in the prompt "
                         "(Tokenizer.fim_prompt), not as a suffix after the canvas")
    stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None
                   else [cfg.eos_id] + ([cfg.eot_id] if cfg.eot_id is not None else []))
    P, N, bl = len(prompt_ids), params.max_new_tokens, params.block_length
    suffix_ids = list(suffix_ids or [])
    if P + N + len(suffix_ids) > cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds the model's context "
                         f"({cfg.max_seq_len})")
    canvas = torch.full((1, N), cfg.mask_id, dtype=torch.long, device=device)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    suffix = torch.tensor([suffix_ids], dtype=torch.long, device=device)
    t0 = torch.zeros(1, device=device)

    def rowvec(x, dtype=torch.float32):
        return torch.tensor([x], dtype=dtype, device=device)

    temp, topp = rowvec(params.temperature), rowvec(params.top_p)
    seeds = rowvec(params.seed, torch.long)
    thr = rowvec(params.confidence_threshold if params.confidence_threshold is not None else math.nan)

    cache = None
    block_causal = cfg.attention == "block_causal"
    if block_causal and params.use_cache:
        cache = KVCache(cfg, batch=1, max_len=P + N, device=device,
                        dtype=next(net.parameters()).dtype)
        if P:
            net(prompt, positions=torch.arange(P, device=device)[None], t=t0,
                attn=cache.context(append=True))

    full_cache = "none" if block_causal else params.full_cache
    fcache = None  # the refresh-time K/V of every position (full_cache != "none")
    L = P + N + len(suffix_ids)
    if full_cache != "none":
        fcache = KVCache(cfg, batch=1, max_len=L, device=device,
                         dtype=next(net.parameters()).dtype)

    total_steps, finish, end = 0, "length", N
    n_blocks = math.ceil(N / bl)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # finished block not yet cached
    for b in range(n_blocks):
        lo, hi = b * bl, min(N, (b + 1) * bl)
        Lb = hi - lo
        steps = params.steps_for(Lb)
        schedule = transfer_schedule(Lb, steps)
        pos = torch.arange(P + lo, P + hi, device=device)[None]  # [1, Lb]
        for s in range(steps):
            block = canvas[:, lo:hi]
            frac = (block == cfg.mask_id).float().mean(1)  # [1] the active block's noise level
            if block_causal and cache is not None and pending is not None:
                prev_ids, prev_pos = pending
                n = prev_ids.shape[1]
                t_tok = torch.cat([torch.zeros(1, n, device=device), frac[:, None].expand(1, Lb)], 1)
                logits = net(torch.cat([prev_ids, block], 1), positions=torch.cat([prev_pos, pos], 1),
                             t=t_tok, attn=cache.context(commit_len=n),
                             logits_slice=slice(n, n + Lb))
                pending = None
            elif block_causal and cache is not None:
                logits = net(block, positions=pos, t=frac, attn=cache.context())
            elif block_causal:
                ids = torch.cat([prompt, canvas[:, :hi]], dim=1)
                seg = segment_ids(P + hi, torch.tensor([P], device=device), bl)
                t_tok = torch.zeros(1, P + hi, device=device)
                t_tok[:, P + lo:] = frac
                logits = net(ids, t=t_tok, attn=DenseAttention(block_causal_mask(seg)),
                             logits_slice=slice(P + lo, P + hi))
            elif fcache is None or s == 0:  # uncached, or the refresh of a cached block
                ids = torch.cat([prompt, canvas, suffix], dim=1)
                t_full = (canvas == cfg.mask_id).float().mean(1)
                logits = net(ids, t=t_full if cfg.time_conditioning else None,
                             attn=fcache.refresh() if fcache is not None else None,
                             logits_slice=slice(P + lo, P + hi))
            else:  # a cached step: recompute [q0, q1), the rest from the refresh
                q0, q1 = cached_query_span(full_cache, P, lo, hi, L, cfg.logit_shift)
                ids = torch.cat([prompt, canvas, suffix], dim=1)[:, q0:q1]
                t_full = (canvas == cfg.mask_id).float().mean(1)
                hide = (torch.tensor([q0], device=device), torch.tensor([q1], device=device))
                logits = net(ids, positions=torch.arange(q0, q1, device=device)[None],
                             t=t_full if cfg.time_conditioning else None,
                             attn=fcache.context(hide=hide),
                             logits_slice=slice(P + lo - q0, P + hi - q0))
            logits = _prepare_logits(logits, cfg, params.suppress_token_ids)
            if b == 0 and params.first_token_ids:
                constrain_first_position(logits, params.first_token_ids)
            new_block, _ = commit_step(
                logits, block, pos, rowvec(s, torch.long), rowvec(schedule[s], torch.long),
                mask_id=cfg.mask_id, rules=[params.remasking], temperature=temp, top_p=topp,
                seeds=seeds, threshold=thr, last_step=rowvec(s == steps - 1, torch.bool),
                defer_ids=[params.defer_token_ids])
            canvas[:, lo:hi] = new_block
            total_steps += 1
            if on_step is not None:
                on_step(canvas[0].tolist(), {"block": b, "step": s, "steps": total_steps})
            if not bool((canvas[:, lo:hi] == cfg.mask_id).any()):
                break
        done = canvas[0, :hi].tolist()
        stop_at = _first_stop(done, stop_ids)
        if stop_at is not None:
            finish, end = "stop", stop_at + 1
            break
        if tokenizer is not None and params.stop:
            text = tokenizer.decode(done)
            if any(s in text for s in params.stop):
                finish, end = "stop", hi
                break
        if cache is not None and b < n_blocks - 1:  # the finished block becomes clean context
            if params.fused_commit:
                pending = (canvas[:, lo:hi].clone(), pos)
            else:
                net(canvas[:, lo:hi], positions=pos, t=t0, attn=cache.context(append=True))
    tokens = canvas[0, :end].tolist()
    text = None
    if tokenizer is not None:
        text = tokenizer.decode([t for t in tokens if t not in stop_ids])
        text, hit = truncate_at_stop(text, params.stop)
        if hit:
            finish = "stop"
    return GenerationResult(tokens=tokens, finish_reason=finish, steps=total_steps,
                            blocks=min(n_blocks, b + 1), text=text)


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string. -> (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
