"""MockEngine: a model-free EngineBase, the double of the tests and the load benchmarks.

    engine = MockEngine(MockEngineConfig(step_delay_s=0.01, max_num_seqs=8))
    await engine.start()
    async for event in engine.submit(GenerationRequest("r1", [5, 6, 7], SamplingParams(...))):
        ...
    await engine.shutdown()

    # under Serve: every ModelServer replica builds one instead of loading the model
    mock = MockEngineFactory("tiny-coder", step_delay_s=0.02)
    serve.run(build_application(args, engine_factory=mock))

Not a deployable choice: no app argument reaches it, only code that builds the app itself.

It behaves like the real engine where a server can notice it:
- one scheduler loop runs a "step" over every running sequence together; a sequence spends
  `min(steps, block_len)` steps per block (steps are per block), then the block is committed and
  streamed as one TextDelta; `diffusing` requests also get a CanvasUpdate after every step;
- tokens are fake but deterministic: words picked from the prompt ids and (when temperature > 0)
  the seed, so a test can predict them (`MockEngine.expected_words`);
- `max_new_tokens`, `stop` strings (finish "stop", text cut before the stop) and an optional
  `eos_after` (finish "stop" after that many tokens; `stop_token_ids=[]` ignores it, as it
  ignores EOS in the real engine) are honoured;
- admission: at most `max_num_seqs` run; the rest wait in a FIFO queue (QueueFullError beyond
  `max_queued`, EngineClosedError after shutdown, as engine.Engine raises them); requests with
  a latency budget go first, by deadline, into `priority_slots` more rows;
- a step costs `step_delay_s + token_cost_s * token-steps`, the tokens the real engine's
  forwards would process (model/schedule.py, a block-causal row: each step runs the active
  block, the prompt and each finished block but the last are written to the cache once), so a
  loaded mock slows down the way a compute-bound engine does, and `stats()` reports the real
  engine's backlog (model/schedule.token_steps_left) and capacity in the same unit;
- `cancel(request_id)` (or closing the event iterator) frees the slot at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.cost_model import StepCostModel
from engine.engine import EngineClosedError, QueueFullError  # the real refusals: served alike
from engine.types import (
    MASK_GLYPH,
    CanvasUpdate,
    EngineBase,
    EngineStats,
    Event,
    Finished,
    GenerationRequest,
    TextDelta,
)
from model.sampling import truncate_at_stop
from model.schedule import BlockSchedule, RowLayout, token_steps_left

log = logging.getLogger(__name__)

# 64 short words: each fake token decodes to " <word>".
WORDS = [
    "alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta",
    "def", "return", "class", "import", "yield", "async", "await", "with", "for", "while",
    "if", "else", "try", "except", "finally", "pass", "break", "continue", "lambda_", "assert",
    "x", "y", "z", "i", "j", "k", "n", "m", "foo", "bar", "baz", "qux", "spam", "eggs", "ham",
    "list", "dict", "set", "tuple", "int", "str", "float", "bool", "None", "True", "False",
    "print", "len", "range", "open", "self", "cls", "args", "kwargs",
]
TOKEN_ID_BASE = 1000  # fake token ids are TOKEN_ID_BASE + word index


@dataclass
class MockEngineConfig:
    step_delay_s: float = 0.0  # fixed wall time of one batched step
    token_cost_s: float = 0.0  # extra wall time per token in the step batch (compute-bound cost)
    max_num_seqs: int = 64  # running slots; more requests queue
    max_queued: int | None = None  # waiting requests beyond which submit raises QueueFullError
    eos_after: int | None = None  # finish with "stop" after this many tokens (None: never)
    # Rows beyond max_num_seqs for requests with a latency budget, admitted first by deadline
    # (engine.EngineConfig.priority_slots); the real engine's own steps for late rows are not
    # mocked.
    priority_slots: int = 2
    # Capacity reported before anything ran (token-steps/s); 0 means "not measured yet".
    initial_capacity: float = 0.0


@dataclass
class _Seq:
    request: GenerationRequest
    out: asyncio.Queue
    words: list[str]  # the whole fake answer (max_new_tokens words)
    schedule: BlockSchedule
    layout: RowLayout  # a block-causal row: the prompt and finished blocks are cached
    block: int = 0  # current block index
    step: int = 0  # steps spent in the current block
    steps_total: int = 0
    cached: int = 0  # tokens the real engine would hold in its KV cache
    committed: list[str] = field(default_factory=list)
    emitted_text: str = ""
    done: bool = False
    deadline: float | None = None  # monotonic time, for requests with a latency budget

    @classmethod
    def create(cls, request: GenerationRequest, words: list[str]) -> _Seq:
        p = request.params
        return cls(request=request, out=asyncio.Queue(), words=words, schedule=p.schedule,
                   layout=RowLayout(len(request.prompt_ids), p.max_new_tokens))

    def block_bounds(self) -> tuple[int, int]:
        return self.schedule.span(self.block)

    def step_token_steps(self) -> int:
        """What the next step costs: the cache writes due before it (the prompt, the block
        just finished), then the denoising forward of the active block."""
        lo, hi = self.block_bounds()
        return self.layout.prompt_len + lo - self.cached + self.layout.step_tokens(lo, hi, self.step)

    def work_left(self) -> int:
        """Token-steps still to run, counted as the real engine counts its backlog."""
        return token_steps_left(self.schedule, self.layout, self.block, self.step, self.cached)


class MockEngineFactory:
    """A replica's engine_factory (deployments.app.build_application): a MockEngine with these options,
    and the tokenizer and config of `source` (a preset or a directory in our own format: the
    API needs the tokenizer; the weights are never loaded). Picklable, so Serve ships it."""

    def __init__(self, source: str = "tiny-coder", **mock_options):
        self.source = source
        self.config = MockEngineConfig(**mock_options)

    def __call__(self) -> tuple[MockEngine, object, object]:
        from model.checkpoint import EMBEDDED_DIR
        from model.config import ModelConfig
        from model.tokenizer import Tokenizer

        path = EMBEDDED_DIR if self.source == "tiny-coder" else Path(self.source)
        return MockEngine(self.config), Tokenizer.load(path), ModelConfig.load(path)


class MockEngine(EngineBase):
    def __init__(self, config: MockEngineConfig | None = None):
        self.config = config or MockEngineConfig()
        self._queue: collections.deque[_Seq] = collections.deque()
        self._running: dict[str, _Seq] = {}
        self._by_id: dict[str, _Seq] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._accepting = True
        # Recent rates, exponentially averaged per step.
        self._step_ms = 0.0
        self._tok_per_s = 0.0
        self._capacity = float(self.config.initial_capacity)
        self._cost = StepCostModel()  # fitted from its own steps, as engine.Engine's
        self.steps_run = 0  # batched steps run since start (tests look at it)

    # --- deterministic fake output ----------------------------------------------------------
    @staticmethod
    def expected_words(prompt_ids: list[int], n: int, temperature: float = 0.0,
                       seed: int = 0) -> list[str]:
        key = ",".join(map(str, prompt_ids)) + (f"|{seed}" if temperature > 0 else "")
        x, out = zlib.crc32(key.encode()), []
        for _ in range(n):  # a small LCG: cheap, stable across Python versions
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out.append(WORDS[(x >> 8) % len(WORDS)])
        return out

    @staticmethod
    def word_ids(words: list[str]) -> list[int]:
        return [TOKEN_ID_BASE + WORDS.index(w) for w in words]

    # --- EngineBase -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        request.params.validate()
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down")
        free = max(0, self.config.max_num_seqs - len(self._running))  # as engine.Engine counts
        if self.config.max_queued is not None and len(self._queue) >= self.config.max_queued + free:
            raise QueueFullError(f"{len(self._queue)} requests are already queued")
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        p = request.params
        words = self.expected_words(request.prompt_ids, p.max_new_tokens, p.temperature, p.seed)
        seq = _Seq.create(request, words)
        self._by_id[request.request_id] = seq
        if request.latency_budget_s is None:
            self._queue.append(seq)
        else:  # before every unbudgeted request, earliest deadline first (as engine.Engine)
            seq.deadline = time.monotonic() + request.latency_budget_s
            at = next((i for i, s in enumerate(self._queue)
                       if s.deadline is None or s.deadline > seq.deadline), len(self._queue))
            self._queue.insert(at, seq)
        self._wakeup.set()
        return self._events(seq)

    async def _events(self, seq: _Seq) -> AsyncIterator[Event]:
        try:
            while True:
                event = await seq.out.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not seq.done:  # the consumer went away (client disconnect): free the slot
                await self.cancel(seq.request.request_id)

    async def cancel(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is None or seq.done:
            return
        if seq in self._queue:
            self._queue.remove(seq)
        self._finish(seq, "cancelled")

    def stats(self) -> EngineStats:
        backlog = sum(s.work_left() for s in self._running.values())
        backlog += sum(s.work_left() for s in self._queue)
        return EngineStats(
            queued=len(self._queue), running=len(self._running), token_backlog=backlog,
            step_latency_ms=self._step_ms, output_tokens_per_s=self._tok_per_s,
            capacity_token_steps_per_s=self._capacity,
            iterations=self.steps_run, step_cost=self._cost.to_dict(),
            extra={"engine": "mock", "max_num_seqs": self.config.max_num_seqs},
        )

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while (self._running or self._queue) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for seq in list(self._queue) + list(self._running.values()):
            self._finish(seq, "cancelled")
        self._queue.clear()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    # --- scheduler ----------------------------------------------------------------------------
    def _finish(self, seq: _Seq, reason: str) -> None:
        if seq.done:
            return
        seq.done = True
        self._running.pop(seq.request.request_id, None)
        self._by_id.pop(seq.request.request_id, None)
        seq.out.put_nowait(Finished(
            request_id=seq.request.request_id, finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids), completion_tokens=len(seq.committed),
            steps=seq.steps_total, text=seq.emitted_text))

    async def _run(self) -> None:
        cfg = self.config
        while True:
            while self._queue and len(self._running) < cfg.max_num_seqs + (
                    cfg.priority_slots if self._queue[0].deadline is not None else 0):
                seq = self._queue.popleft()
                self._running[seq.request.request_id] = seq
            if not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(self._running.values())
            tokens_in_batch = sum(s.step_token_steps() for s in batch)
            t0 = time.perf_counter()
            delay = cfg.step_delay_s + cfg.token_cost_s * tokens_in_batch
            await asyncio.sleep(delay)  # the "forward pass"; yields so HTTP keeps flowing
            committed_now = 0
            for seq in batch:
                if not seq.done:
                    committed_now += self._advance(seq)
            dt = max(time.perf_counter() - t0, 1e-6)
            self._cost.add(len(batch), tokens_in_batch, 0.0, dt)
            self.steps_run += 1
            a = 0.2  # EMA weight: ~5 steps of memory
            self._step_ms = (1 - a) * self._step_ms + a * dt * 1e3 if self._step_ms else dt * 1e3
            self._tok_per_s = (1 - a) * self._tok_per_s + a * committed_now / dt
            cap = tokens_in_batch / dt
            self._capacity = (1 - a) * self._capacity + a * cap if self._capacity else cap

    def _advance(self, seq: _Seq) -> int:
        """One denoising step for one sequence. Returns tokens committed (block finished)."""
        p = seq.request.params
        lo, hi = seq.block_bounds()
        seq.cached = seq.layout.prompt_len + lo  # the writes before this step are done
        seq.step += 1
        seq.steps_total += 1
        steps = seq.schedule.steps_in(seq.block)
        if seq.request.diffusing:
            shown = sum(seq.schedule.commits(seq.block)[: seq.step])
            canvas = seq.committed + seq.words[lo:lo + shown] + [MASK_GLYPH] * (hi - lo - shown)
            seq.out.put_nowait(CanvasUpdate(seq.request.request_id,
                                            "".join(" " + w for w in canvas), seq.steps_total))
        if seq.step < steps:
            return 0
        # Block finished: commit it, check EOS / stop strings / length.
        new = seq.words[lo:hi]
        finish = None
        eos_on = p.stop_token_ids is None or len(p.stop_token_ids) > 0  # [] = ignore EOS
        if self.config.eos_after is not None and eos_on and hi >= self.config.eos_after:
            new = new[: max(0, self.config.eos_after - lo)]
            finish = "stop"
        seq.committed += new
        text = "".join(" " + w for w in seq.committed)
        text, hit = truncate_at_stop(text, p.stop)
        if hit:
            finish = "stop"
        delta = text[len(seq.emitted_text):]
        if delta or new:
            seq.emitted_text = text
            seq.out.put_nowait(TextDelta(seq.request.request_id, delta, self.word_ids(new)))
        seq.block += 1
        seq.step = 0
        if finish is None and hi >= p.max_new_tokens:
            finish = "length"
        if finish is not None:
            self._finish(seq, finish)
        return len(new)


def mock_steps_used(n_tokens: int, steps: int, block_length: int) -> int:
    """Steps a (not stopped early) request of n_tokens spends: model/schedule.py's count."""
    return BlockSchedule(n_tokens, block_length, steps).total_steps


__all__ = ["MockEngine", "MockEngineConfig", "WORDS", "mock_steps_used"]
