"""The block schedule and its cost: one request's canvas in blocks, steps and token-steps.

    sched = BlockSchedule(max_new_tokens=80, block_length=32, steps=8)
    sched.n_blocks, sched.span(2), sched.steps_in(2)   # 3, (64, 80), 8
    sched.commits(2)                                   # [2, 2, 2, 2, 2, 2, 2, 2]
    row = RowLayout(prompt_len=10)                     # block-causal, no suffix
    token_steps_left(sched, row)                       # the whole request's cost
    request_token_steps(10, 80, 8, 32)                 # the same, from plain numbers
    aligned_schedule(prompt_len=10, max_new_tokens=80, block_length=32, steps=8)
    # blocks aligned to position 0: canvas [0, 22) [22, 54) [54, 86), 86 = 96 - 10

The canvas is `max_new_tokens` masks cut into blocks of `block_length` (the last may be shorter).
Block b is denoised in min(steps, its length) steps (steps are per block, never more than one
token each), and step s of it commits `commits(b)[s]` tokens: an even split of the block over
its steps, earlier steps taking the remainder (LLaDA's schedule), or Dream's time schedule
(`step_schedule="dream"`, transfer_schedule says how). A confidence threshold may
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

STEP_SCHEDULES = ("even", "dream")
DREAM_EPS = 1e-3  # Dream's generation_config.eps: the last time of linspace(1, eps, T + 1)


def transfer_schedule(n_masked: int, steps: int, kind: str = "even") -> list[int]:
    """Commits per step for n_masked masks over `steps` steps (capped at n_masked).

    "even": an even split, earlier steps taking the remainder (LLaDA's get_num_transfer_tokens).
    "dream": Dream's diffusion_generate: times t = linspace(1, eps, steps + 1); step i commits
    int(n_i * (1 - t[i+1] / t[i])) of the n_i masks still left, the last step all of them. At
    one step per token most early steps commit 0 (n (1 - t'/t) < 1 until t is small) and the
    rest go late: that is Dream's published behaviour, kept as is. n_i is the masked count
    Dream reads before step i; with exactly these commits it is n_masked minus the commits so
    far, so the list is fixed in advance. Dream computes in float32 torch, this in float64:
    the lists agree for every n <= 69 and n in (128, 256, 512) at every steps <= n (checked
    against torch.linspace; tests/model/test_dream_exact.py pins a sample)."""
    steps = max(1, min(steps, n_masked)) if n_masked else 1
    if kind == "dream":
        t = [1.0 + (DREAM_EPS - 1.0) * i / steps for i in range(steps + 1)]
        out, left = [], n_masked
        for i in range(steps):
            k = left if i == steps - 1 else int(left * (1.0 - t[i + 1] / t[i]))
            out.append(k)
            left -= k
        return out
    if kind != "even":
        raise ValueError(f"step schedule must be one of {STEP_SCHEDULES}, got {kind!r}")
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass(frozen=True)
class BlockSchedule:
    """How a canvas of max_new_tokens splits into blocks and steps (the module docstring)."""
    max_new_tokens: int
    block_length: int
    steps: int  # denoising steps per block, capped at the block's length
    step_schedule: str = "even"  # commits per step: transfer_schedule's "even" | "dream"
    # Blocks aligned to position 0 (ModelConfig.block_align "zero"): canvas position 0 sits
    # `offset` = prompt_len % block_length tokens into its block, so block 0 is the
    # block_length - offset tail of the block the prompt ends in (aligned_schedule below).
    offset: int = 0

    @property
    def n_blocks(self) -> int:
        return math.ceil((self.max_new_tokens + self.offset) / self.block_length)

    def span(self, b: int) -> tuple[int, int]:
        """[lo, hi): block b in the canvas."""
        bl, off = self.block_length, self.offset
        return max(0, b * bl - off), min(self.max_new_tokens, (b + 1) * bl - off)

    def steps_in(self, b: int) -> int:
        lo, hi = self.span(b)
        if self.offset and b == 0:  # the whole block's schedule: done once it covers the tail
            done = 0
            for n, k in enumerate(self.commits(0), 1):
                done += k
                if done >= hi - lo:
                    return n
            return len(self.commits(0))
        return min(self.steps, hi - lo)

    def commits(self, b: int) -> list[int]:
        """Tokens scheduled to commit at each step of block b (they add up to its length). A
        block cut short by `offset` keeps the whole block's schedule, as LLaDA2's and SDAR's
        generate split block_length over the steps whatever is masked (the block is left
        once nothing is)."""
        lo, hi = self.span(b)
        if self.offset and b == 0:
            return transfer_schedule(self.block_length, min(self.steps, self.block_length),
                                     self.step_schedule)
        return transfer_schedule(hi - lo, self.steps_in(b), self.step_schedule)

    def plan(self, b: int, s: int) -> tuple[int, bool]:
        """Step s of block b: (tokens scheduled to commit, whether it is the block's last step,
        which commits whatever is still masked)."""
        return self.commits(b)[s], s == self.steps_in(b) - 1

    @property
    def total_steps(self) -> int:
        """Denoising forward passes of a request that takes every step of every block."""
        return sum(self.steps_in(b) for b in range(self.n_blocks))


def aligned_schedule(prompt_len: int, max_new_tokens: int, block_length: int, steps: int,
                     step_schedule: str = "even") -> BlockSchedule:
    """Blocks aligned to position 0 (LLaDA2.x, SDAR, Fast-dLLM v2): the canvas starts
    prompt_len % block_length into its block and runs to the next block boundary past
    max_new_tokens (their generate pads the last block with masks, which are denoised like the
    others and cut from the answer), so every block but the first is whole."""
    offset = prompt_len % block_length
    total = -(-(prompt_len + max_new_tokens) // block_length) * block_length
    return BlockSchedule(total - prompt_len, block_length, steps, step_schedule=step_schedule,
                         offset=offset)


def canvas_schedule(prompt_len: int, max_new_tokens: int, block_length: int, steps: int,
                    block_align: str = "prompt", block_causal: bool = True,
                    step_schedule: str = "even") -> BlockSchedule:
    """A request's schedule: aligned_schedule for block-causal models with blocks aligned to
    position 0, else the canvas of max_new_tokens from the prompt's end."""
    if block_causal and block_align == "zero":
        return aligned_schedule(prompt_len, max_new_tokens, block_length, steps, step_schedule)
    return BlockSchedule(max_new_tokens, block_length, steps, step_schedule=step_schedule)


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
    # Blocks aligned to position 0: the prompt's last block_head tokens (prompt_len %
    # block_length) are not prefilled but run with block 0 in its block (BlockSchedule.offset).
    block_head: int = 0

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
            return n * (hi - lo + (self.block_head if lo == 0 else 0))
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
        head = self.block_head if sched.n_blocks == 1 else 0  # the head is written with block 0
        return self.prompt_len + sched.span(sched.n_blocks - 1)[0] - head


def token_steps_left(sched: BlockSchedule, row: RowLayout, block: int = 0, step: int = 0,
                     cached: int = 0) -> int:
    """Token-steps still ahead of a request that has taken `step` steps of block `block` and
    has `cached` tokens in the KV cache (the module docstring; an upper bound). A block-causal
    row needs the prompt and the blocks before the active one cached before its next step, so
    what is missing of those is still to be written; each later block but the last is written
    once it is done."""
    total = 0
    if row.block_causal:
        head = row.block_head if block == 0 else 0  # not prefilled: it runs with block 0
        total += row.prompt_len - head + sched.span(block)[0] - cached
    for b in range(block, sched.n_blocks):
        lo, hi = sched.span(b)
        total += row.block_token_steps(lo, hi, step if b == block else 0, sched.steps_in(b))
        if row.block_causal and b < sched.n_blocks - 1:
            # the cache write of the finished block (block 0 with the prompt's head)
            total += hi - lo + (row.block_head if lo == 0 else 0)
    return total


def request_token_steps(prompt_tokens: int, max_new_tokens: int, steps: int, block_length: int,
                        block_causal: bool = True, full_cache: str = "none",
                        suffix_tokens: int = 0, logit_shift: bool = False,
                        block_align: str = "prompt") -> int:
    """Cost in token-steps of a new request, as the engine counts its backlog before it runs.
    prompt_tokens includes the fill-in-the-middle suffix's `suffix_tokens`."""
    P = prompt_tokens - suffix_tokens
    sched = canvas_schedule(P, max_new_tokens, block_length, steps, block_align, block_causal)
    row = RowLayout(P, sched.max_new_tokens, suffix_tokens, block_causal,
                    full_cache, logit_shift, block_head=sched.offset)
    return token_steps_left(sched, row)


__all__ = ["BlockSchedule", "RowLayout", "STEP_SCHEDULES", "aligned_schedule", "cached_query_span",
           "canvas_schedule", "request_token_steps", "token_steps_left", "transfer_schedule"]
