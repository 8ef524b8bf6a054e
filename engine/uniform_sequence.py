"""One uniform-diffusion request inside the engine (DiffusionGemma): engine/sequence.py's
Sequence with the renoising process's per-sequence state.

    seq = UniformSequence.create(request, cfg, tokenizer, device)   # validates; ValueError
    seq.uniform                 # model/uniform.UniformParams: family defaults + the request's
    seq.generator               # the request's torch.Generator (params.seed): every draw
    seq.self_cond               # [C, d] the previous step's soft embedding, None at a canvas start
    seq.history                 # [S, C] the last S argmax canvases (adaptive stopping)
    seq.accepted                # [C] bool, the positions the last step accepted (diffusing view)

The answer is written canvas by canvas: blocks of the model's canvas length over
ceil(max_new_tokens / C) canvases (a canvas is always whole: the network sees C tokens; the
answer is cut to max_new_tokens at the end). Each canvas starts as random tokens drawn from the
request's generator, runs until adaptive stopping or max_denoising_steps (engine/uniform_batch.py
decides, with model/uniform.py's functions), and its last argmax becomes the block's tokens;
then the usual block end (engine/sequence.py): stop token or string -> Finished, else the text
delta and `pending_append`, the canvas-level commit (the finished canvas is encoded causally into
the cache before the next canvas's first step). The self-conditioning state and the stopping
history are dropped when a canvas ends.

`diffusing` streams show each intermediate canvas with the accepted positions as their tokens
and the re-drawn ones as MASK_GLYPH: the re-drawn tokens are uniform noise over a 262k-token
vocabulary (unreadable, different every step), so a placeholder says what they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.detok import TextStream, render_canvas
from engine.sequence import Sequence
from engine.types import CanvasUpdate, Event, GenerationRequest, TextDelta
from model.config import ModelConfig
from model.rules import stop_token_ids
from model.schedule import BlockSchedule, RowLayout
from model.uniform import UniformParams, random_canvas, uniform_params

PLACEHOLDER = -1  # a re-drawn position in a diffusing view (rendered as MASK_GLYPH)


@dataclass(eq=False)
class UniformSequence(Sequence):
    uniform: UniformParams | None = None
    generator: torch.Generator | None = None
    self_cond: torch.Tensor | None = None
    history: torch.Tensor | None = None
    accepted: torch.Tensor | None = None

    @classmethod
    def create(cls, request: GenerationRequest, cfg: ModelConfig, tokenizer,
               device) -> UniformSequence:
        params = request.params.validate()
        prompt = [int(t) for t in request.prompt_ids]
        if request.suffix_ids:
            raise ValueError("this model does not support fill-in-the-middle")
        if any(not 0 <= t < cfg.vocab_size for t in prompt):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        uni = uniform_params(cfg, params).validate()
        C = cfg.block_length
        n_canvas = math.ceil(params.max_new_tokens / C)
        if len(prompt) + n_canvas * C > cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + {n_canvas} canvases of {C} tokens exceed "
                             f"the model's context ({cfg.max_seq_len})")
        stop_ids = stop_token_ids(cfg, params.stop_token_ids)
        sched = BlockSchedule(n_canvas * C, C, min(uni.max_denoising_steps, C))
        seq = cls(request=request, params=params, cfg=cfg, tokenizer=tokenizer, prompt=prompt,
                  suffix=[], stop_ids=stop_ids, banned=[],
                  canvas=torch.zeros(n_canvas * C, dtype=torch.long, device=device),
                  stream=TextStream(tokenizer, stop_ids, params.stop), schedule=sched,
                  layout=RowLayout(len(prompt), n_canvas * C, 0, True), uniform=uni,
                  generator=torch.Generator(device=device).manual_seed(params.seed))
        seq._new_canvas()
        return seq

    # --- the canvas ---------------------------------------------------------------------------
    def _new_canvas(self) -> None:
        """The active canvas starts as random tokens; its per-canvas state starts empty."""
        lo, hi = self.block_span()
        self.canvas[lo:hi] = random_canvas(hi - lo, self.cfg.vocab_size, self.generator,
                                           self.canvas.device)
        self.self_cond, self.accepted = None, None
        self.history = torch.full((self.uniform.stability_threshold, hi - lo), -1,
                                  dtype=torch.long, device=self.canvas.device)

    def after_step(self, masks_left: int) -> bool:
        """masks_left: 0 when the runner found the canvas done (stopped or out of steps)."""
        self.total_steps += 1
        self.step += 1
        return masks_left == 0 or self.step >= self.uniform.max_denoising_steps

    def backlog(self) -> int:
        """Token-steps left, an upper bound: every canvas left takes all its steps of C tokens,
        plus the causal writes (the prompt if not cached, each finished canvas but the last)."""
        C, N = self.cfg.block_length, self.uniform.max_denoising_steps
        left = self.schedule.n_blocks - self.block
        total = left * N * C - self.step * C
        total += max(0, len(self.prompt) - self.cached_len) + (left - 1) * C
        return max(total, 0)

    def canvas_event(self) -> CanvasUpdate:
        lo, hi = self.block_span()
        ids = self.canvas.clone()
        if self.accepted is not None:  # mid-canvas: re-drawn positions are noise
            ids[lo:hi] = torch.where(self.accepted, ids[lo:hi], PLACEHOLDER)
        ids[hi:] = PLACEHOLDER  # canvases not started
        n = self.params.max_new_tokens
        return CanvasUpdate(self.request_id,
                            render_canvas(self.tokenizer, ids[:n].tolist(), PLACEHOLDER),
                            self.total_steps)

    def finish_block(self) -> list[Event]:
        """The canvas is final (its argmax): stop checks, its text, Finished or the next canvas.
        The last canvas is cut to max_new_tokens."""
        lo, hi = self.block_span()
        N = self.params.max_new_tokens
        block_ids = self.canvas[lo:min(hi, N)].tolist()
        stop_at = next((i for i, t in enumerate(block_ids) if t in self.stop_ids), None)
        if stop_at is not None:
            return self._finish("stop", lo + stop_at + 1)
        # a stop string inside this canvas: finish before streaming any of it (TextStream.push
        # holds back only a tail that could start a stop string, not one already complete)
        if self.params.stop:
            text = self.tokenizer.decode(self.stream.text_ids + block_ids)
            if any(s in text for s in self.params.stop if s):
                return self._finish("stop", min(hi, N))
        delta, ids = self.stream.push(block_ids)
        events: list[Event] = [TextDelta(self.request_id, delta, ids)] if delta else []
        if self.block == self.schedule.n_blocks - 1:
            return events + self._finish("length", min(hi, N))
        P = len(self.prompt)
        self.pending_append = (P + lo, P + hi)  # the canvas-level commit, next iteration
        self.block += 1
        self.step = 0
        self._new_canvas()
        return events
