"""The block schedule and its cost: one request's canvas in blocks, steps and token-steps.

    sched = BlockSchedule(max_new_tokens=80, block_length=32, steps=8)
    sched.n_blocks, sched.span(2), sched.steps_in(2)   # 3, (64, 80), 8
    sched.commits(2)                                   # [2, 2, 2, 2, 2, 2, 2, 2]
    row = RowLayout(prompt_len=10)                     # block-causal, no suffix
    token_steps_left(sched, row)                       # the whole request's cost
    request_token_steps(10, 80, 8, 32)                 # the same, from plain numbers

The canvas is `max_new_tokens` masks cut into blocks of `block_length` (the last may be shorter).
Block b is denoised in min(steps, its length) steps (steps are per block, never more than one
token each), and step s of it commits `commits(b)[s]` tokens: an even split of the block over
its steps, earlier steps taking the remainder (LLaDA's schedule). A confidence threshold may
commit more per step and leave a block early; a block is also left once nothing is masked.

A token-step is one token through one forward pass; it is the unit of the engine's backlog and
capacity, so backlog / capacity estimates the seconds to drain. A request's cost counts, for
each denoising step, the tokens that step runs (`RowLayout.step_tokens`), plus, for block-causal
models, the tokens written to the KV cache once (the prompt, then every finished block but the
last). It assumes every block takes all its steps and nothing stops early: an upper bound.

Pure Python, no torch: the reference sampler (model/sampling.py), the engine (engine/sequence.py),
the step router's burst ledger and the mock engine all count with these functions, so the
numbers they report agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Even split of n_masked commits over `steps` steps, earlier steps taking the remainder."""
    steps = max(1, min(steps, n_masked)) if n_masked else 1
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass(frozen=True)
class BlockSchedule:
    """How a canvas of max_new_tokens splits into blocks and steps (the module docstring)."""
    max_new_tokens: int
    block_length: int
    steps: int  # denoising steps per block, capped at the block's length

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.max_new_tokens / self.block_length)

    def span(self, b: int) -> tuple[int, int]:
        """[lo, hi): block b in the canvas."""
        bl = self.block_length
        return b * bl, min(self.max_new_tokens, (b + 1) * bl)

    def steps_in(self, b: int) -> int:
        lo, hi = self.span(b)
        return min(self.steps, hi - lo)

    def commits(self, b: int) -> list[int]:
        """Tokens scheduled to commit at each step of block b (they add up to its length)."""
        lo, hi = self.span(b)
        return transfer_schedule(hi - lo, self.steps_in(b))

    def plan(self, b: int, s: int) -> tuple[int, bool]:
        """Step s of block b: (tokens scheduled to commit, whether it is the block's last step,
        which commits whatever is still masked)."""
        return self.commits(b)[s], s == self.steps_in(b) - 1

    @property
    def total_steps(self) -> int:
        """Denoising forward passes of a request that takes every step of every block."""
        return sum(self.steps_in(b) for b in range(self.n_blocks))


def cached_query_span(mode: str, prompt_len: int, lo: int, hi: int, total: int,
                      logit_shift: bool) -> tuple[int, int]:
    """[q0, q1): the positions a cached step of a full-attention model recomputes, for the block
    at canvas [lo, hi) of a row of `total` tokens (prompt, canvas, suffix). "prefix" recomputes
    the block and everything after it, "dual" the block alone; models with shifted logits (the
    hidden state at i - 1 predicts token i) recompute the token before the block too. The cache's
    copies of these positions are hidden from the step; every other cached position is attended."""
    start = prompt_len + lo
    q0 = start - 1 if logit_shift and start > 0 else start
    q1 = total if mode == "prefix" else prompt_len + hi
    return q0, q1


@dataclass(frozen=True)
class RowLayout:
    """Which tokens one request's forwards run. Block-causal rows run the active block over the
    exact KV cache of the prompt and finished blocks; full-attention rows run prompt + canvas +
    suffix, or with an approximate cache (full_cache "prefix" / "dual") the whole row at a
    block's first step (the refresh, which stores every position's K/V) and `cached_span` at
    the others. Block-causal rows ignore full_cache (it becomes "none"): their cache is exact."""
    prompt_len: int  # without the fill-in-the-middle suffix
    max_new_tokens: int = 0
    suffix_len: int = 0
    block_causal: bool = True
    full_cache: str = "none"
    logit_shift: bool = False

    def __post_init__(self) -> None:
        if self.block_causal and self.full_cache != "none":
            object.__setattr__(self, "full_cache", "none")

    @property
    def full_len(self) -> int:
        """Prompt + canvas + suffix: the row of a full-attention forward."""
        return self.prompt_len + self.max_new_tokens + self.suffix_len

    def cached_span(self, lo: int, hi: int) -> tuple[int, int]:
        """[q0, q1): the positions a cached (not refreshing) step of block [lo, hi) runs."""
        return cached_query_span(self.full_cache, self.prompt_len, lo, hi, self.full_len,
                                 self.logit_shift)

    def step_tokens(self, lo: int, hi: int, s: int) -> int:
        """Tokens the denoising forward of step s of block [lo, hi) runs."""
        return self.block_token_steps(lo, hi, s, s + 1)

    def block_token_steps(self, lo: int, hi: int, first: int, end: int) -> int:
        """Tokens the denoising forwards of steps first .. end - 1 of block [lo, hi) run."""
        n = max(0, end - first)
        if self.block_causal:
            return n * (hi - lo)
        if self.full_cache == "none":
            return n * self.full_len
        refresh = 1 if first == 0 and n else 0
        q0, q1 = self.cached_span(lo, hi)
        return refresh * self.full_len + (n - refresh) * (q1 - q0)

    def cache_tokens(self, sched: BlockSchedule) -> int:
        """KV slots a request holds: the prompt and every block but the last (block-causal;
        the last block is never written), the whole row (a full-attention cache), else none."""
        if self.full_cache != "none":
            return self.full_len
        if not self.block_causal:
            return 0
        return self.prompt_len + sched.span(sched.n_blocks - 1)[0]


def token_steps_left(sched: BlockSchedule, row: RowLayout, block: int = 0, step: int = 0,
                     cached: int = 0) -> int:
    """Token-steps still ahead of a request that has taken `step` steps of block `block` and
    has `cached` tokens in the KV cache (the module docstring; an upper bound). A block-causal
    row needs the prompt and the blocks before the active one cached before its next step, so
    what is missing of those is still to be written; each later block but the last is written
    once it is done."""
    total = 0
    if row.block_causal:
        total += row.prompt_len + sched.span(block)[0] - cached
    for b in range(block, sched.n_blocks):
        lo, hi = sched.span(b)
        total += row.block_token_steps(lo, hi, step if b == block else 0, sched.steps_in(b))
        if row.block_causal and b < sched.n_blocks - 1:
            total += hi - lo  # the cache write of the finished block
    return total


def request_token_steps(prompt_tokens: int, max_new_tokens: int, steps: int, block_length: int,
                        block_causal: bool = True, full_cache: str = "none",
                        suffix_tokens: int = 0, logit_shift: bool = False) -> int:
    """Cost in token-steps of a new request, as the engine counts its backlog before it runs.
    prompt_tokens includes the fill-in-the-middle suffix's `suffix_tokens`."""
    sched = BlockSchedule(max_new_tokens, block_length, steps)
    row = RowLayout(prompt_tokens - suffix_tokens, max_new_tokens, suffix_tokens, block_causal,
                    full_cache, logit_shift)
    return token_steps_left(sched, row)


__all__ = ["BlockSchedule", "RowLayout", "cached_query_span", "request_token_steps",
           "token_steps_left", "transfer_schedule"]
