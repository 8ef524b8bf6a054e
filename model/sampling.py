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
- entropy_bound (EB-sampler, arXiv 2505.24857): the lowest-entropy predictions whose summed
  entropy minus the largest stays under `entropy_bound` (at least one); `steps` is a cap, as
  for the threshold. The same acceptance as DiffusionGemma's uniform sampler (model/uniform.py).
k follows an even split of the block over its steps (LLaDA's schedule). With temperature > 0 the
predictions are Gumbel-max samples keyed by (seed, position, step), so a seed fixes the output.
Blocks, steps and their cost are model/schedule.py's, the banned and stop tokens model/rules.py's;
the engine uses both.

Layouts: block-causal models keep an exact KV cache of the prompt and finished blocks
(model/cache.py) and run only the active block; `use_cache=False` recomputes everything with the
block-causal mask (same logits, the cache's test). Full-attention models (LLaDA, Dream) run the
whole canvas every step, with a fill-in-the-middle suffix after it when given.
Block length 1 with one step is autoregressive decoding on the same weights.
Block-causal models whose blocks are aligned to position 0 (cfg.block_align "zero": LLaDA2.x,
SDAR, Fast-dLLM v2) cache the prompt's whole blocks block-causally, denoise block 0 after the
prompt's tail in the same block and run the canvas to a block boundary (cut at max_new_tokens);
with `threshold_floor="schedule"` a threshold step commits the larger of (above the threshold,
the scheduled count), their rule (model/schedule.aligned_schedule, tests/model/test_loaders_moe).

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
later commits: that staleness is the approximation (model/schedule.cached_query_span says which
positions a cached step runs; the engine uses the same). Forwards per block are the same as
without the cache; a cached one runs L - q0 (prefix) or P + hi - q0 (dual) tokens instead of L.
Time-conditioned full models feed t (the whole canvas's masked fraction) to every forward.
Block-causal models ignore `full_cache`: their cache is already exact.

Classifier-free guidance (`cfg_scale` > 0, LLaDA's generate): every uncached full-attention
forward also runs the row with its prompt and suffix masked, and the step commits from
`uncond + (cfg_scale + 1) * (cond - uncond)` (`guided_logits`).

`commit_step` is the per-step rule for a batch of rows with their own settings; the engine calls
it too, which is what makes the engine's tokens equal this reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from kernels.commit_select import commit_candidates
from kernels.noise import position_noise
from model.cache import KVCache
from model.config import ModelConfig
from model.diffusion import block_causal_mask, segment_ids
from model.rules import (
    ban_tokens,
    banned_token_ids,
    constrain_first_position,
    constrains_first_token,
    stop_token_ids,
)
from model.schedule import STEP_SCHEDULES, BlockSchedule, cached_query_span, canvas_schedule
from model.transformer import DenseAttention
from model.uniform import DEFAULT_ENTROPY_BOUND, entropy_bound_accept

RemaskingRule = Literal["low_confidence", "margin", "entropy", "random", "entropy_bound"]
FullCacheMode = Literal["none", "prefix", "dual"]
# Which distribution the commit rules score positions on (confidence, margin, entropy):
# "raw": softmax(logits) whatever the temperature (LLaDA's generate);
# "nucleus": softmax(logits / T) truncated to top_p, top_p applied at T = 0 too (Dream's
#   sample_tokens; its entropy is sum p log(p + 1e-10), as Dream writes it);
# "drawn": the distribution the token is drawn from: raw at T = 0, the tempered top_p nucleus
#   at T > 0 (Fast-dLLM v2's sample_with_top_p).
ScoringMode = Literal["raw", "nucleus", "drawn"]
StepSchedule = Literal["even", "dream"]
REMASKING_RULES: tuple[str, ...] = get_args(RemaskingRule)
FULL_CACHE_MODES: tuple[str, ...] = get_args(FullCacheMode)
ThresholdFloor = Literal["one", "schedule"]
THRESHOLD_FLOORS: tuple[str, ...] = get_args(ThresholdFloor)
SCORING_MODES: tuple[str, ...] = get_args(ScoringMode)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    steps: int = 8  # denoising steps per block; capped at block_length
    block_length: int = 32
    remasking: RemaskingRule = "low_confidence"
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
    full_cache: FullCacheMode = "none"
    # Commits per step (model/schedule.transfer_schedule): "even" (LLaDA's split) or "dream"
    # (Dream's linspace(1, eps, T + 1) times).
    step_schedule: StepSchedule = "even"
    scoring: ScoringMode = "raw"  # which distribution positions are scored on (ScoringMode)
    # LLaDA's confidence_eos_eot_inf, exactly: these ids still may be predicted, but their logits
    # are -inf in the softmax that gives the confidence, so a position predicting one scores 0
    # and every other confidence is renormalised without them (raw scoring only).
    confidence_inf_token_ids: list[int] = field(default_factory=list)
    # Fast-dLLM v2's sub-block decoding: each block is denoised sub-block by sub-block of this
    # many tokens, the commit rule choosing only among the first sub-block that still has masks.
    sub_block_length: int | None = None
    # Fast-dLLM v2: a block that starts right after clean context (the prompt, a finished
    # block) opens with one token decoded autoregressively, the argmax of the next-token
    # logits after that context (shifted models: its last hidden state), before its diffusion.
    ar_block_start: bool = False
    # Fast-dLLM v2: a block is left as soon as a stop token is committed with nothing masked
    # before it in the answer (what follows the stop is never read): fewer steps, same tokens.
    stop_in_block: bool = False
    # Classifier-free guidance (LLaDA's generate(cfg_scale=...)): > 0 runs each step a second
    # row with the prompt (and suffix) masked and commits from the guided logits
    # uncond + (cfg_scale + 1) * (cond - uncond). Full-attention models without full_cache.
    cfg_scale: float = 0.0
    # With confidence_threshold: how many a step commits at least. "one": every prediction
    # above the threshold, at least one (Fast-dLLM); "schedule": the larger of those above it
    # and the step's scheduled count (LLaDA2.x's and SDAR's low_confidence_dynamic).
    threshold_floor: ThresholdFloor = "one"
    # The entropy bound of the EB-sampler rule (remasking "entropy_bound": each step commits the
    # lowest-entropy masked predictions whose summed entropy minus the largest stays under it,
    # at least one; steps becomes a cap; None = 0.1) and, for uniform-diffusion models
    # (DiffusionGemma, model/uniform.py), its acceptance bound; with max_denoising_steps, the
    # uniform canvas's step cap. None = the model's generation_config.json.
    entropy_bound: float | None = None
    max_denoising_steps: int | None = None

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.block_length < 1:
            raise ValueError("block_length must be >= 1")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {self.remasking!r}")
        if self.entropy_bound is not None and not self.entropy_bound > 0:
            raise ValueError("entropy_bound must be > 0")
        if self.max_denoising_steps is not None and self.max_denoising_steps < 1:
            raise ValueError("max_denoising_steps must be >= 1")
        if self.confidence_threshold is not None and not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError("confidence_threshold must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.full_cache not in FULL_CACHE_MODES:
            raise ValueError(f"full_cache must be one of {FULL_CACHE_MODES}, "
                             f"got {self.full_cache!r}")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"step_schedule must be one of {STEP_SCHEDULES}, "
                             f"got {self.step_schedule!r}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {SCORING_MODES}, got {self.scoring!r}")
        if self.confidence_inf_token_ids and self.scoring != "raw":
            raise ValueError("confidence_inf_token_ids (LLaDA's confidence_eos_eot_inf) scores "
                             "the raw distribution: use scoring 'raw'")
        if self.sub_block_length is not None and self.sub_block_length < 1:
            raise ValueError("sub_block_length must be >= 1")
        if self.threshold_floor not in THRESHOLD_FLOORS:
            raise ValueError(f"threshold_floor must be one of {THRESHOLD_FLOORS}, "
                             f"got {self.threshold_floor!r}")
        if not 0.0 <= self.cfg_scale <= 100.0:
            raise ValueError("cfg_scale must be in [0, 100]")
        if self.cfg_scale > 0 and self.full_cache != "none":
            raise ValueError("cfg_scale needs full_cache 'none': the unconditional row has no "
                             "cache of its own")
        return self

    def scores_sampled(self) -> bool:
        """Whether this request's positions are scored on the tempered, top_p-truncated
        distribution (ScoringMode) rather than the raw one."""
        return scores_sampled(self.scoring, self.temperature)

    @property
    def schedule(self) -> BlockSchedule:
        """The canvas in blocks and steps (model/schedule.py), blocks from the prompt's end."""
        return BlockSchedule(self.max_new_tokens, self.block_length, self.steps,
                             step_schedule=self.step_schedule)

    def schedule_for(self, prompt_len: int, cfg: ModelConfig) -> BlockSchedule:
        """The schedule of a request on this model: blocks aligned to position 0 for
        block-causal models with cfg.block_align "zero" (model/schedule.canvas_schedule)."""
        return canvas_schedule(prompt_len, self.max_new_tokens, self.block_length, self.steps,
                               cfg.block_align, cfg.attention == "block_causal",
                               self.step_schedule)


def scores_sampled(scoring: str, temperature: float) -> bool:
    """ScoringMode -> whether scores come from the tempered, top_p-truncated distribution."""
    return scoring == "nucleus" or (scoring == "drawn" and temperature > 0)


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens, truncated after the first stop token
    finish_reason: str  # "stop" (stop token or string) or "length"
    steps: int  # denoising forward passes spent (cache writes not counted)
    blocks: int
    text: str | None = None  # when a tokenizer was given: decoded, cut before a stop string


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale) -> torch.Tensor:
    """Classifier-free guidance as LLaDA computes it: uncond + (cfg_scale + 1) * (cond - uncond).
    cond, uncond [B, Lb, V]; cfg_scale a float or [B] (per row, 0 = cond unchanged)."""
    if isinstance(cfg_scale, torch.Tensor):
        cfg_scale = cfg_scale.to(cond.dtype)[:, None, None]
    return uncond + (cfg_scale + 1) * (cond - uncond)


def commit_step(logits: torch.Tensor, block: torch.Tensor, positions: torch.Tensor,
                step_idx: torch.Tensor, n_commit: torch.Tensor, *, mask_id: int,
                rules: list[str], temperature: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, threshold: torch.Tensor,
                last_step: torch.Tensor,
                defer_ids: list[list[int]] | None = None,
                sampled: torch.Tensor | None = None,
                conf_inf_ids: list[list[int]] | None = None,
                sub_block: torch.Tensor | None = None,
                floor_schedule: torch.Tensor | None = None,
                entropy_bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step's commit for B rows.

    logits [B, Lb, V]; block [B, Lb] current tokens (mask_id where still masked; rows may be
    padded with non-mask tokens); positions [B, Lb] absolute positions (key the noise);
    step_idx [B] step within the block; n_commit [B] scheduled commits; threshold [B] (NaN = off);
    last_step [B] bool (commit everything left); defer_ids: per row, tokens ranked last;
    sampled [B] bool: score on the tempered, top_p-truncated distribution (ScoringMode; None:
    raw for every row); conf_inf_ids: per row, ids whose logits are -inf in the confidence's
    softmax (LLaDA's confidence_eos_eot_inf); sub_block [B, Lb] long: each position's
    sub-block, only the first sub-block with masks may commit (Fast-dLLM v2; None: no
    sub-blocks); floor_schedule [B] bool: a threshold step commits at least n_commit, not 1
    (threshold_floor "schedule"; None: at least 1 for every row); entropy_bound [B] (NaN = off):
    the "entropy_bound" rule's bound, k = the EB-sampler's accepted count (model/uniform.py).
    Returns (new block [B, Lb], committed [B, Lb]).
    """
    B, Lb, V = logits.shape
    masked = block == mask_id
    flat = lambda x: x[:, None].expand(B, Lb).reshape(-1)  # noqa: E731 - per-row -> per-position
    cand = commit_candidates(logits.reshape(B * Lb, V), flat(temperature), flat(top_p),
                             flat(seeds), positions.reshape(-1), flat(step_idx),
                             sampled_scores=flat(sampled) if sampled is not None else None)
    tokens = cand.tokens.view(B, Lb)
    confidence = cand.confidence.view(B, Lb)
    if conf_inf_ids is not None and any(conf_inf_ids):
        confidence = confidence.clone()
        for row, ids in enumerate(conf_inf_ids):
            if ids:
                confidence[row] = confidence_without(logits[row], tokens[row], ids)
    scores = torch.empty(B, Lb, device=logits.device)
    uniform = len(set(rules)) == 1  # the common case: no per-row mask, no host-to-device copy
    for rule in set(rules):
        if rule == "low_confidence":
            s = confidence
        elif rule == "margin":
            s = cand.margin
        elif rule in ("entropy", "entropy_bound"):
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
    # the positions that may commit: the masked ones, of the first sub-block that has masks
    eligible = masked
    if sub_block is not None:
        first = sub_block.masked_fill(~masked, torch.iinfo(sub_block.dtype).max).min(1).values
        eligible = torch.where(last_step[:, None], masked, masked & (sub_block == first[:, None]))
    scores = scores.masked_fill(~eligible, float("-inf"))
    # k per row: the schedule, or everything above the threshold (at least 1), or all at the end
    conf = confidence.masked_fill(~eligible, -1.0)
    use_thr = ~torch.isnan(threshold)
    above = (conf > threshold.nan_to_num(2.0)[:, None]).sum(1)
    floor = above.clamp_min(1)
    if floor_schedule is not None:  # LLaDA2 / SDAR: max(above the threshold, the schedule)
        floor = torch.where(floor_schedule, torch.maximum(above, n_commit), floor)
    k = torch.where(use_thr, floor, n_commit)
    if entropy_bound is not None:  # EB-sampler: the lowest-entropy set under the bound
        n_eb = entropy_bound_accept(cand.entropy.view(B, Lb).float(),
                                    entropy_bound.nan_to_num(0.0), eligible).sum(1).clamp_min(1)
        k = torch.where(~torch.isnan(entropy_bound), n_eb, k)
    k = torch.where(last_step, masked.sum(1), k)
    k = torch.minimum(k, eligible.sum(1))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(Lb, device=order.device).expand(B, Lb))
    committed = (rank < k[:, None]) & eligible
    return torch.where(committed, tokens, block), committed


def confidence_without(logits: torch.Tensor, tokens: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """p(token) under softmax(logits) with `ids` set to -inf first: logits [L, V], tokens [L]
    -> [L]. LLaDA's confidence_eos_eot_inf: a position predicting one of `ids` scores 0, the
    others are renormalised over the rest of the vocabulary."""
    lf = logits.float().index_fill(-1, torch.tensor(ids, device=logits.device), float("-inf"))
    return lf.softmax(-1).gather(-1, tokens[:, None])[:, 0]


def sub_block_index(positions: torch.Tensor, block_start: torch.Tensor,
                    sub_block_length: int | None) -> torch.Tensor | None:
    """Each position's sub-block [B, L] (long) counted from block_start [B], the first position
    of its (aligned) block; None without sub-blocks."""
    if sub_block_length is None:
        return None
    return (positions - block_start[:, None]) // sub_block_length


class _Row:
    """One generate() call's sequence: prompt [1, P], canvas [1, N] (mask_id where still masked)
    and suffix [1, S], with the caches its layout keeps. Each `*_logits` method is one layout's
    denoising forward of the block at canvas [lo, hi) and returns its logits [1, Lb, V]."""

    def __init__(self, net: torch.nn.Module, prompt_ids: list[int], suffix_ids: list[int],
                 params: SamplingParams):
        cfg: ModelConfig = net.cfg
        weights = next(net.parameters())
        dev = self.device = weights.device
        self.net, self.cfg, self.block_length = net, cfg, params.block_length
        self.prompt = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
        self.P = len(prompt_ids)
        # blocks aligned to position 0 (cfg.block_align "zero"): the canvas is padded to a block
        # boundary and block 0 runs after the prompt's last `head` tokens, in their block
        self.sched = params.schedule_for(self.P, cfg)
        self.head = self.sched.offset
        self.aligned = cfg.attention == "block_causal" and cfg.block_align == "zero"
        self.canvas = torch.full((1, self.sched.max_new_tokens), cfg.mask_id, dtype=torch.long,
                                 device=dev)
        self.suffix = torch.tensor([suffix_ids], dtype=torch.long, device=dev)
        self.L = self.P + self.canvas.shape[1] + len(suffix_ids)
        self.t0 = torch.zeros(1, device=dev)
        self.block_causal = cfg.attention == "block_causal"
        self.full_cache = "none" if self.block_causal else params.full_cache
        self.fused_commit = params.fused_commit
        self.cfg_scale = params.cfg_scale
        self.cache: KVCache | None = None  # block-causal: exact K/V of prompt + finished blocks
        self.fcache: KVCache | None = None  # full attention: refresh-time K/V of every position
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # finished, not cached
        if self.block_causal and params.use_cache:
            self.cache = KVCache(cfg, batch=1, max_len=self.L, device=dev, dtype=weights.dtype)
            if self.aligned:
                # the prompt's whole blocks, one block-causal block at a time
                bl = self.block_length
                for a in range(0, self.P - self.head, bl):
                    net(self.prompt[:, a:a + bl], positions=torch.arange(a, a + bl, device=dev)[None],
                        t=self.t0, attn=self.cache.context(append=True))
            elif self.P:
                net(self.prompt, positions=torch.arange(self.P, device=dev)[None], t=self.t0,
                    attn=self.cache.context(append=True))
        if self.full_cache != "none":
            self.fcache = KVCache(cfg, batch=1, max_len=self.L, device=dev, dtype=weights.dtype)

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        """[1, hi - lo] absolute positions of canvas [lo, hi)."""
        return torch.arange(self.P + lo, self.P + hi, device=self.device)[None]

    def _with_head(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The tokens a block-causal forward of canvas [lo, hi) runs: the block, after the
        prompt's last `head` tokens for block 0 of an aligned row (they share its block).
        -> ids [1, n + Lb], positions [1, n + Lb], n."""
        n = self.head if lo == 0 else 0
        ids = torch.cat([self.prompt[:, self.P - n:], self.canvas[:, lo:hi]], 1)
        return ids, torch.arange(self.P + lo - n, self.P + hi, device=self.device)[None], n

    def ar_due(self, lo: int) -> bool:
        """Whether canvas position lo opens a block right after clean context (the prompt or
        a finished block, not the prompt's tail sharing the block) and is still masked."""
        return self.P + lo > 0 and lo < self.canvas.shape[1] and (lo > 0 or self.head == 0) \
            and int(self.canvas[0, lo]) == self.cfg.mask_id

    def ar_logits(self, lo: int) -> torch.Tensor:
        """[1, 1, V] next-token logits after prompt + canvas[:lo], all clean, under the layout's
        block-causal mask: one uncached forward (the reference's plain way; the engine reads
        the same logits off its cache write of the context)."""
        E, dev = self.P + lo, self.device
        ids = torch.cat([self.prompt, self.canvas[:, :lo]], dim=1)
        if self.aligned:
            seg = (torch.arange(E, device=dev) // self.block_length)[None]
        else:
            seg = segment_ids(E, torch.tensor([self.P], device=dev), self.block_length)
        mask = block_causal_mask(seg) if self.block_causal else None
        return self.net(ids, t=torch.zeros(1, E, device=dev), attn=DenseAttention(mask),
                        logits_slice=slice(E, E + 1))

    def masked_fraction(self, lo: int, hi: int) -> torch.Tensor:
        """[1] the noise level of canvas [lo, hi)."""
        return (self.canvas[:, lo:hi] == self.cfg.mask_id).float().mean(1)

    def step_logits(self, lo: int, hi: int, s: int) -> torch.Tensor:
        """The layout's forward for step s of the block at canvas [lo, hi)."""
        if self.block_causal:
            if self.cache is None:
                return self._recomputed_logits(lo, hi)
            return self._cached_block_logits(lo, hi)
        if self.fcache is None:
            return self._full_logits(lo, hi, attn=None)
        if s == 0:  # the refresh: the uncached forward, storing every position's K/V
            return self._full_logits(lo, hi, attn=self.fcache.refresh())
        return self._full_cached_logits(lo, hi)

    def commit_block(self, lo: int, hi: int) -> None:
        """The finished block becomes clean context (t = 0) in the block-causal cache: now, or
        with fused_commit in the same forward as the next block's first step."""
        if self.cache is None:
            return
        block, pos, _ = self._with_head(lo, hi)
        if self.fused_commit:
            self.pending = (block.clone(), pos)
        else:
            self.net(block, positions=pos, t=self.t0, attn=self.cache.context(append=True))

    def _cached_block_logits(self, lo: int, hi: int) -> torch.Tensor:
        """Block-causal with the exact cache: the active block alone, after the pending
        finished block when its write is fused into this forward."""
        block, pos, head = self._with_head(lo, hi)
        frac, Lb = self.masked_fraction(lo, hi), hi - lo
        if self.pending is None:
            return self.net(block, positions=pos, t=frac, attn=self.cache.context(),
                            logits_slice=slice(head, head + Lb))
        (prev_ids, prev_pos), self.pending = self.pending, None
        n, Lr = prev_ids.shape[1], block.shape[1]
        t_tok = torch.cat([torch.zeros(1, n, device=self.device), frac[:, None].expand(1, Lr)], 1)
        return self.net(torch.cat([prev_ids, block], 1), positions=torch.cat([prev_pos, pos], 1),
                        t=t_tok, attn=self.cache.context(commit_len=n),
                        logits_slice=slice(n + head, n + head + Lb))

    def _recomputed_logits(self, lo: int, hi: int) -> torch.Tensor:
        """Block-causal without a cache: prompt and canvas up to the block under the
        block-causal mask (the same logits as the cache's; its test)."""
        P = self.P
        ids = torch.cat([self.prompt, self.canvas[:, :hi]], dim=1)
        if self.aligned:  # blocks from position 0, the prompt's included
            seg = (torch.arange(P + hi, device=self.device) // self.block_length)[None]
        else:
            seg = segment_ids(P + hi, torch.tensor([P], device=self.device), self.block_length)
        t_tok = torch.zeros(1, P + hi, device=self.device)  # clean context at t = 0
        t_tok[:, P + lo:] = self.masked_fraction(lo, hi)
        return self.net(ids, t=t_tok, attn=DenseAttention(block_causal_mask(seg)),
                        logits_slice=slice(P + lo, P + hi))

    def _canvas_t(self) -> torch.Tensor | None:
        """Time-conditioned full models see the whole canvas's masked fraction [1]."""
        if not self.cfg.time_conditioning:
            return None
        return (self.canvas == self.cfg.mask_id).float().mean(1)

    def _full_logits(self, lo: int, hi: int, attn) -> torch.Tensor:
        """Full attention over prompt + canvas + suffix (attn None: plain, or a refresh)."""
        ids = torch.cat([self.prompt, self.canvas, self.suffix], dim=1)
        if self.cfg_scale > 0 and attn is None:
            return self._guided_logits(ids, lo, hi)
        return self.net(ids, t=self._canvas_t(), attn=attn,
                        logits_slice=slice(self.P + lo, self.P + hi))

    def _guided_logits(self, ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Classifier-free guidance: the row and its unconditional copy (every prompt and
        suffix token masked, as LLaDA masks its prompt_index) in one forward [2, L]."""
        uncond = ids.clone()
        uncond[:, :self.P] = self.cfg.mask_id
        uncond[:, self.P + self.canvas.shape[1]:] = self.cfg.mask_id
        t = self._canvas_t()
        both = self.net(torch.cat([ids, uncond]), t=None if t is None else t.expand(2),
                        logits_slice=slice(self.P + lo, self.P + hi))  # [2, Lb, V]
        return guided_logits(both[:1], both[1:], self.cfg_scale)

    def _full_cached_logits(self, lo: int, hi: int) -> torch.Tensor:
        """A cached step: recompute [q0, q1), attend to the refresh's K/V for the rest."""
        P = self.P
        q0, q1 = cached_query_span(self.full_cache, P, lo, hi, self.L, self.cfg.logit_shift)
        ids = torch.cat([self.prompt, self.canvas, self.suffix], dim=1)[:, q0:q1]
        hide = (torch.tensor([q0], device=self.device), torch.tensor([q1], device=self.device))
        return self.net(ids, positions=torch.arange(q0, q1, device=self.device)[None],
                        t=self._canvas_t(), attn=self.fcache.context(hide=hide),
                        logits_slice=slice(P + lo - q0, P + hi - q0))


def _commit_settings(params: SamplingParams, device) -> dict[str, torch.Tensor]:
    """The per-row sampling settings of commit_step, for one row."""
    def rowvec(x, dtype=torch.float32):
        return torch.tensor([x], dtype=dtype, device=device)

    thr = params.confidence_threshold
    return dict(temperature=rowvec(params.temperature), top_p=rowvec(params.top_p),
                seeds=rowvec(params.seed, torch.long),
                threshold=rowvec(thr if thr is not None else math.nan),
                sampled=rowvec(True, torch.bool) if params.scores_sampled() else None,
                conf_inf_ids=[list(params.confidence_inf_token_ids)],
                floor_schedule=rowvec(True, torch.bool)
                if params.threshold_floor == "schedule" else None,
                entropy_bound=rowvec(entropy_bound_of(params))
                if params.remasking == "entropy_bound" else None)


def entropy_bound_of(params: SamplingParams) -> float:
    """The bound of the "entropy_bound" rule (DEFAULT_ENTROPY_BOUND when the request sets none)."""
    return params.entropy_bound if params.entropy_bound is not None else DEFAULT_ENTROPY_BOUND


def aligned_block_start(first_position: int, block_length: int, block_align: str) -> int:
    """The absolute position where the block holding `first_position` starts: itself when blocks
    start at the prompt's end, else the multiple of block_length at or below it (blocks aligned
    to position 0: LLaDA2.x, SDAR, Fast-dLLM v2). Sub-blocks count from there."""
    if block_align == "zero":
        return first_position - first_position % block_length
    return first_position


def stop_is_final(answer: torch.Tensor, stop_ids: list[int], mask_id: int) -> torch.Tensor:
    """answer [B, L] (canvas from position 0, mask_id where masked) -> bool [B]: a stop token is
    committed with nothing masked before it, so the answer is final (stop_in_block)."""
    masked = (answer == mask_id).long()
    is_stop = torch.isin(answer, torch.tensor(stop_ids, device=answer.device))
    return (is_stop & (masked.cumsum(1) - masked == 0)).any(1)


def _denoise_block(row: _Row, params: SamplingParams, b: int, banned: list[int],
                   steps_before: int, on_step, stop_ids: set[int] | None = None) -> int:
    """Every step of block b (until nothing is masked, or with params.stop_in_block until a
    stop token ends the answer). -> steps taken in the block."""
    sched, dev, mask_id = row.sched, row.device, row.cfg.mask_id
    lo, hi = sched.span(b)
    pos = row.positions(lo, hi)  # [1, Lb]
    settings = _commit_settings(params, dev)
    block_start = aligned_block_start(row.P + lo, params.block_length,
                                      getattr(row.cfg, "block_align", "prompt"))
    settings["sub_block"] = sub_block_index(pos, torch.tensor([block_start], device=dev),
                                            params.sub_block_length)
    for s in range(sched.steps_in(b)):
        logits = row.step_logits(lo, hi, s)  # [1, Lb, V]
        ban_tokens(logits, [banned])
        if constrains_first_token(params.first_token_ids, b):
            constrain_first_position(logits[:, 0], params.first_token_ids)
        n_commit, last = sched.plan(b, s)
        new_block, _ = commit_step(
            logits, row.canvas[:, lo:hi], pos, torch.tensor([s], device=dev),
            torch.tensor([n_commit], device=dev), mask_id=mask_id, rules=[params.remasking],
            last_step=torch.tensor([last], device=dev), defer_ids=[params.defer_token_ids],
            **settings)
        row.canvas[:, lo:hi] = new_block
        if on_step is not None:
            on_step(row.canvas[0].tolist(),
                    {"block": b, "step": s, "steps": steps_before + s + 1})
        if not bool((row.canvas[:, lo:hi] == mask_id).any()):
            return s + 1
        if params.stop_in_block and stop_ids and bool(stop_is_final(
                row.canvas[:, :min(hi, params.max_new_tokens)], sorted(stop_ids), mask_id)[0]):
            return s + 1
    return sched.steps_in(b)


def _block_stop(done: list[int], hi: int, stop_ids: set[int], tokenizer,
                stops: list[str]) -> int | None:
    """After a block ending at canvas position hi: where the answer ends if it stops here (just
    after the first stop token, or at hi for a stop string in the text), else None."""
    stop_at = next((i for i, tok in enumerate(done) if tok in stop_ids), None)
    if stop_at is not None:
        return stop_at + 1
    if tokenizer is not None and stops:
        text = tokenizer.decode(done)
        if any(s in text for s in stops):
            return hi
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
    if suffix_ids and cfg.attention == "block_causal":
        raise ValueError("block-causal models take fill-in-the-middle in the prompt "
                         "(Tokenizer.fim_prompt), not as a suffix after the canvas")
    if params.cfg_scale > 0 and cfg.attention == "block_causal":
        raise ValueError("cfg_scale (classifier-free guidance) is for full-attention models")
    if params.ar_block_start and not (cfg.logit_shift and cfg.attention == "block_causal"):
        raise ValueError("ar_block_start is for block-causal models with shifted logits "
                         "(Fast-dLLM v2)")
    P, N, suffix_ids = len(prompt_ids), params.max_new_tokens, list(suffix_ids or [])
    padded = params.schedule_for(P, cfg).max_new_tokens  # N, or to a block boundary (aligned)
    if P + padded + len(suffix_ids) > cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds the model's context "
                         f"({cfg.max_seq_len})")
    stop_ids = stop_token_ids(cfg, params.stop_token_ids)
    banned = banned_token_ids(cfg, params.suppress_token_ids)
    row = _Row(net, prompt_ids, suffix_ids, params)
    sched = row.sched
    total_steps, finish, end, blocks = 0, "length", N, 0
    for b in range(sched.n_blocks):
        lo, hi = sched.span(b)
        if params.ar_block_start and row.ar_due(lo):
            logits = row.ar_logits(lo)  # [1, 1, V]
            ban_tokens(logits, [banned])
            if constrains_first_token(params.first_token_ids, b) and lo == 0:
                constrain_first_position(logits[:, 0], params.first_token_ids)
            row.canvas[0, lo] = logits[0, 0].argmax()  # argmax at every temperature (its code)
        total_steps += _denoise_block(row, params, b, banned, total_steps, on_step, stop_ids)
        blocks += 1
        done = min(hi, N)  # an aligned canvas's padding past max_new_tokens is not the answer
        stop_end = _block_stop(row.canvas[0, :done].tolist(), done, stop_ids, tokenizer,
                               params.stop)
        if stop_end is not None:
            finish, end = "stop", stop_end
            break
        if b < sched.n_blocks - 1:
            row.commit_block(lo, hi)
    tokens = row.canvas[0, :end].tolist()
    text, finish = answer_text(tokens, stop_ids, tokenizer, params.stop, finish)
    return GenerationResult(tokens=tokens, finish_reason=finish, steps=total_steps,
                            blocks=blocks, text=text)


def answer_text(tokens: list[int], stop_ids, tokenizer, stops: list[str],
                finish: str) -> tuple[str | None, str]:
    """The answer's text (stop ids left out, cut before the first stop string; None without a
    tokenizer) and the finish reason ("stop" when a stop string cut it, else `finish`)."""
    if tokenizer is None:
        return None, finish
    text, hit = truncate_at_stop(tokenizer.decode([t for t in tokens if t not in stop_ids]), stops)
    return text, "stop" if hit else finish


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string. -> (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
