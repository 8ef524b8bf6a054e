"""One request's state inside the engine: its canvas, where it is in its block schedule, its cache.

    seq = Sequence.create(request, cfg, tokenizer, device)   # validates; raises ValueError
    seq.block_span()            # (lo, hi) of the active block in the canvas
    seq.after_step(masks_left)  # -> True when the active block is done (no masks or steps used up)
    events = seq.finish_block() # stop checks, text delta, Finished; or sets up the next block

Models whose blocks are aligned to position 0 (cfg.block_align "zero": LLaDA2.x, SDAR) prefill
the prompt's whole blocks block-causally, run block 0 after the prompt's tail (`block_head`)
and denoise a canvas padded to a block boundary, cut to max_new_tokens in the answer.
The schedule is model/sampling.generate's, step for step, because both read model/schedule.py:
blocks of `block_length` over `max_new_tokens` masks, `steps_in(b)` steps per block with the
even commit split, the block left early when nothing is masked; stop tokens and stop strings
are checked when a block is done, and a finished block is re-encoded as clean context (the
`pending_append`) before the next one. The banned and stop tokens are model/rules.py's.
Full-attention rows with `params.full_cache` ("prefix" / "dual") refresh their K/V of the whole
row at each block's first step and run only `cached_span()` at the later ones (the reference's
approximation); they hold pages for the whole row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.detok import TextStream, render_canvas
from engine.types import (
    CanvasUpdate,
    ContextTooLongError,
    Event,
    Finished,
    GenerationRequest,
    TextDelta,
)
from model.config import ModelConfig
from model.rules import banned_token_ids, constrains_first_token, stop_token_ids
from model.sampling import SamplingParams, truncate_at_stop
from model.schedule import BlockSchedule, RowLayout, token_steps_left

WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass
class Sequence:
    request: GenerationRequest
    params: SamplingParams
    cfg: ModelConfig
    tokenizer: object
    prompt: list[int]
    suffix: list[int]
    stop_ids: set[int]
    banned: list[int]  # token ids whose logits are -inf (model/rules.banned_token_ids)
    canvas: torch.Tensor  # [N] long: the generated region, mask_id where still masked
    stream: TextStream
    schedule: BlockSchedule
    layout: RowLayout  # which tokens this row's forwards run
    state: str = WAITING
    block: int = 0  # index of the active block
    step: int = 0  # steps taken in the active block
    total_steps: int = 0  # denoising forward passes spent (cache writes not counted)
    cached_len: int = 0  # tokens of this sequence in the KV pool
    pages: list[int] = field(default_factory=list)
    pending_append: tuple[int, int] | None = None  # (start, end) in prompt+canvas to cache next
    # chunked prefill (engine/prefill.py): layers of pending_append written so far, and the
    # hidden state [1, n, d] entering layer prefill_layer
    prefill_layer: int = 0
    prefill_hidden: torch.Tensor | None = None
    committed: int = 0  # tokens committed so far (for output tok/s)
    finished: Finished | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    # perf_counter time by which a request with a latency budget should be done (None: none):
    # the engine admits the earliest first, before every unbudgeted request, and lets the row
    # step alone when the full step's pace would make it late
    deadline: float | None = None
    lora_slot: int = -1  # the adapter slot this row's forwards use (model/lora.py); -1: none

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, request: GenerationRequest, cfg: ModelConfig, tokenizer, device) -> Sequence:
        params = request.params.validate()
        prompt = [int(t) for t in request.prompt_ids]
        suffix = [int(t) for t in (request.suffix_ids or [])]
        block_causal = cfg.attention == "block_causal"
        if suffix and block_causal:
            raise ValueError("block-causal models take fill-in-the-middle in the prompt "
                             "(Tokenizer.fim_prompt), not as a suffix after the canvas")
        if params.cfg_scale > 0 and block_causal:
            raise ValueError("cfg_scale (classifier-free guidance) is for full-attention models")
        if params.ar_block_start and not (cfg.logit_shift and block_causal):
            raise ValueError("ar_block_start is for block-causal models with shifted logits "
                             "(Fast-dLLM v2)")
        n = params.max_new_tokens
        # blocks aligned to position 0 (cfg.block_align "zero") pad the canvas to a block boundary
        schedule = params.schedule_for(len(prompt), cfg)
        if len(prompt) + schedule.max_new_tokens + len(suffix) > cfg.max_seq_len:
            raise ContextTooLongError(f"prompt ({len(prompt)}) + max_new_tokens ({n}) exceeds "
                                      f"the model's context ({cfg.max_seq_len})")
        if any(not 0 <= t < cfg.vocab_size for t in prompt + suffix):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        stop_ids = stop_token_ids(cfg, params.stop_token_ids)
        layout = RowLayout(len(prompt), schedule.max_new_tokens, len(suffix), block_causal,
                           params.full_cache, cfg.logit_shift, block_head=schedule.offset)
        return cls(request=request, params=params, cfg=cfg, tokenizer=tokenizer, prompt=prompt,
                   suffix=suffix, stop_ids=stop_ids,
                   banned=banned_token_ids(cfg, params.suppress_token_ids),
                   canvas=torch.full((schedule.max_new_tokens,), cfg.mask_id, dtype=torch.long,
                                     device=device),
                   stream=TextStream(tokenizer, stop_ids, params.stop),
                   schedule=schedule, layout=layout)

    # --- the block schedule ---------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def full_cache(self) -> str:
        """The full-attention cache mode ("none" for block-causal rows)."""
        return self.layout.full_cache

    def span(self, b: int) -> tuple[int, int]:
        return self.schedule.span(b)

    def block_span(self) -> tuple[int, int]:
        return self.schedule.span(self.block)

    def step_plan(self) -> tuple[int, int, bool]:
        """(step index in the block, tokens scheduled to commit, whether it is the last step)."""
        n_commit, last = self.schedule.plan(self.block, self.step)
        return self.step, n_commit, last

    @property
    def first_token_constrained(self) -> bool:
        """Token healing applies to this step: block 0 with canvas position 0 still masked."""
        return constrains_first_token(self.params.first_token_ids, self.block) \
            and int(self.canvas[0]) == self.cfg.mask_id

    @property
    def full_len(self) -> int:
        """Prompt + canvas + suffix: the row of a full-attention forward."""
        return self.layout.full_len

    @property
    def refreshing(self) -> bool:
        """A full-cache row at its block's first step: the whole row runs and stores its K/V."""
        return self.full_cache != "none" and self.step == 0

    def cached_span(self) -> tuple[int, int]:
        """[q0, q1): the positions a cached (not refreshing) step of the active block runs."""
        return self.layout.cached_span(*self.block_span())

    def cache_tokens_needed(self) -> int:
        """KV slots reserved at admission (model/schedule.RowLayout.cache_tokens)."""
        return self.layout.cache_tokens(self.schedule)

    def steps_left(self) -> int:
        """Denoising steps (iterations) left if no block stops early: what the scheduler weighs
        a deadline against."""
        s = self.schedule
        return max(0, s.steps_in(self.block) - self.step) + sum(
            s.steps_in(b) for b in range(self.block + 1, s.n_blocks))

    def backlog(self) -> int:
        """Token-steps left, an upper bound (see Engine.stats): model/schedule.token_steps_left
        from the active block and step, with what is in the KV pool."""
        return token_steps_left(self.schedule, self.layout, self.block, self.step,
                                self.cached_len)

    @property
    def block_head(self) -> int:
        """Prompt tokens that run with the active block instead of sitting in the cache: the
        prompt's tail in block 0's block when blocks are aligned to position 0, else 0."""
        return self.layout.block_head if self.block_span()[0] == 0 else 0

    def admit(self, pages: list[int]) -> None:
        self.state, self.pages = RUNNING, pages
        prefill = len(self.prompt) - self.layout.block_head  # aligned: whole blocks only
        if self.layout.block_causal and prefill:
            self.pending_append = (0, prefill)

    def ar_position(self) -> int | None:
        """Fast-dLLM v2 (params.ar_block_start): the canvas position the pending cache write is
        followed by, when it opens a block that is still masked there -- its token is the
        argmax of the write's next-token logits (model/sampling.generate does the same)."""
        if not self.params.ar_block_start or self.pending_append is None:
            return None
        at = self.pending_append[1] - len(self.prompt)
        if 0 <= at < self.canvas.shape[0] and int(self.canvas[at]) == self.cfg.mask_id:
            return at
        return None

    def append_ids(self) -> list[int]:
        """Tokens of pending_append (positions start..end over prompt + canvas; an aligned
        row's block 0 starts inside the prompt)."""
        start, end = self.pending_append
        P = len(self.prompt)
        if end <= P:
            return self.prompt[start:end]
        return self.prompt[start:P] + self.canvas[max(0, start - P):end - P].tolist()

    # --- after a step ---------------------------------------------------------------------
    def after_step(self, masks_left: int) -> bool:
        self.total_steps += 1
        self.step += 1
        return masks_left == 0 or self.step >= self.schedule.steps_in(self.block)

    def canvas_event(self) -> CanvasUpdate:
        return CanvasUpdate(self.request_id, render_canvas(self.tokenizer, self.canvas.tolist(),
                                                           self.cfg.mask_id), self.total_steps)

    def finish_block(self) -> list[Event]:
        """The active block is final: stop checks, its text, then Finished or the next block."""
        lo, block_hi = self.block_span()
        hi = min(block_hi, self.params.max_new_tokens)  # an aligned canvas's padding: no answer
        block_ids = self.canvas[lo:hi].tolist()
        stop_at = next((i for i, t in enumerate(block_ids) if t in self.stop_ids), None)
        if stop_at is not None:
            return self._finish("stop", lo + stop_at + 1)
        delta, ids = self.stream.push(block_ids)
        events: list[Event] = [TextDelta(self.request_id, delta, ids)] if delta else []
        if self.params.stop and any(s in self.stream.text for s in self.params.stop):
            return events + self._finish("stop", hi)
        if self.block == self.schedule.n_blocks - 1:
            return events + self._finish("length", hi)
        if self.layout.block_causal:  # the finished block becomes clean context for the next one
            P = len(self.prompt)
            self.pending_append = (P + lo - self.block_head, P + block_hi)
        self.block += 1
        self.step = 0
        return events

    def _finish(self, reason: str, end: int) -> list[Event]:
        tokens = self.canvas[:end].tolist()
        text = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids])
        text, hit = truncate_at_stop(text, self.params.stop)
        if hit:
            reason = "stop"
        delta, ids = self.stream.flush(text, tokens[self.stream.n_tokens:])
        # the last delta also carries tokens without text (a stop token), so deltas add up
        events: list[Event] = [TextDelta(self.request_id, delta, ids)] if delta or ids else []
        self.finished = Finished(self.request_id, reason, len(self.prompt), len(tokens),
                                 self.total_steps, text=text)
        self.state = DONE
        return events + [self.finished]

    def abort(self, reason: str, error: str | None = None) -> Finished:
        """Finished for a cancelled or failed sequence: usage counts the tokens of the blocks
        already final, the text is what was streamed."""
        done_tokens = self.block_span()[0]
        self.finished = Finished(self.request_id, reason, len(self.prompt), done_tokens,
                                 self.total_steps, text=self.stream.sent, error=error)
        self.state = DONE
        return self.finished
