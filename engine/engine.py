"""The engine of one replica: step-level continuous batching of diffusion LM requests.

    engine = Engine(net, tokenizer, net.cfg, EngineConfig(max_num_seqs=16))
    await engine.start()                       # or let the first submit start it
    async for event in engine.submit(request): # TextDelta / CanvasUpdate ... Finished
        ...
    await engine.cancel(request_id)            # or stop iterating: the slot frees at the next step
    engine.stats()                             # EngineStats for the router and the autoscaler
    await engine.shutdown(drain_timeout_s=30)

A scheduler loop (an asyncio task) runs one iteration at a time: between iterations it drops
cancelled sequences and admits queued ones (FIFO, while a slot and the KV pages for the whole
request are free; requests with a latency budget first, earliest deadline first, and into
EngineConfig.priority_slots beyond max_num_seqs when every slot is held, and a row whose
deadline the full step's pace would miss steps alone for up to EngineConfig.urgent_run
iterations in a row); then, in a worker thread so the event loop keeps serving, it runs (1) one
batched cache write for the prompts just admitted and the blocks just finished (block-causal
models only) and (2) ONE denoising step over every running sequence together, each with its own
steps, block length, commit rule, threshold, temperature/top_p and seed (engine/batch.py).
Sequences therefore join and leave between steps: a new request is prefilled and takes its first
step in the next iteration, whatever the others are doing. With EngineConfig.prefill_chunk_tokens
a longer write is prefilled a group of layers per iteration instead (engine/prefill.py, one
such chunk per iteration beside everyone's step; the row steps once its cache is complete), so a
long prompt stalls the running streams by a chunk, not by its whole prefill.

Full-attention models (LLaDA, Dream) run the whole row every step, or, for requests with
`params.full_cache` "prefix" / "dual", Fast-dLLM's approximate cache: a refresh forward at each
block's first step stores the row's K/V in its pages, later steps run only part of the row
(engine/batch.py). The paged pool of a full-attention model is created with the first such
request (sized by EngineConfig as for block-causal models): a deployment that never turns the
cache on keeps that memory. Admission then reserves pages for the whole row.

Cache write and step are separate forwards (SamplingParams.use_cache / fused_commit do not
apply: block-causal K/V is always cached and written in its own forward; the reference pins
those paths to the same tokens). Fusing the write into the step, as generate(fused_commit=True)
does for one sequence, would pad every row of a dense batch to previous + current block
whenever any row has a write pending: at 16 rows and 8 steps per block that is ~88% of steps,
nearly doubling the step's tokens; separate, the writes measured 9-18% of iteration time in
bench_engine (the tokens they must process anyway).

Uniform-diffusion families (DiffusionGemma: FamilyDefaults.process "uniform") run through the
same loop with their own sequence, runner and pool (engine/uniform_sequence.py,
engine/uniform_batch.py): the cache write is the causal encode of a prompt or a finished canvas,
the step is the decoder over the whole canvas with each row's self-conditioning state and its
own generator, and a canvas is done when adaptive stopping says so or its steps run out.

A failing forward does not take others down: the batch is retried row by row and only the row
that fails again gets Finished(finish_reason="error").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from engine.adapters import EngineAdapters, UnknownAdapterError
from engine.batch import StepRunner
from engine.config import EngineConfig
from engine.cost_model import StepCostModel
from engine.kv_pool import PagedKVPool
from engine.prefill import ChunkedPrefill
from engine.sequence import DONE, RUNNING, Sequence
from engine.types import (
    ContextTooLongError,
    EngineBase,
    EngineStats,
    Event,
    Finished,
    GenerationRequest,
)
from engine.uniform_batch import LayeredKVPool, UniformStepRunner, layered_num_pages
from engine.uniform_sequence import UniformSequence
from model.config import ModelConfig
from model.families import family_defaults
from model.loaders.lora import AdapterWeights
from model.lora import LoRABank

log = logging.getLogger(__name__)

# The longest the worker runs iterations without the loop's turn (_iterate_until_news): the
# engine's counters (stats(), read by the load reports) are at most this stale.
ITERATE_FOR_S = 0.05


class QueueFullError(RuntimeError):
    """submit() when EngineConfig.max_queued requests already wait (the server answers 503 with
    Retry-After)."""


class EngineClosedError(RuntimeError):
    """submit() after shutdown() began."""


@dataclass
class _Iteration:
    """What one worker-thread iteration hands back to the loop."""
    events: list[tuple[Sequence, Event]] = field(default_factory=list)
    token_steps: int = 0  # real tokens through the forwards
    committed: int = 0  # tokens committed by the step
    cache_write_s: float = 0.0  # time in the cache-write forward (prefill, finished blocks)
    worker_s: float = 0.0  # time inside the worker thread (the rest is handing over)
    rows: int = 0  # sequences in the denoising step (the step cost model's features)
    attn_kpairs: float = 0.0  # thousands of (query, key) pairs the forwards attended


class Engine(EngineBase):
    def __init__(self, net: torch.nn.Module, tokenizer, cfg: ModelConfig | None = None,
                 config: EngineConfig | None = None):
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg if cfg is not None else net.cfg
        self.config = (config or EngineConfig()).validate()
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pool: PagedKVPool | None = None
        # uniform (renoising) diffusion, DiffusionGemma: its own sequences, runner and pool
        # (engine/uniform_*.py); everything else of the scheduler is shared
        self.uniform = family_defaults(self.cfg).process == "uniform"
        if self.cfg.attention == "block_causal":
            self._create_pool()
        # LoRA: slots hooked onto the network's Linears (model/lora.py) before the runner looks
        # for them; adapters by name, read once (add_adapter), resident up to max_loras
        self.loras = EngineAdapters(net, self.config)
        self.runner = UniformStepRunner(net, self.pool, self.config) if self.uniform \
            else StepRunner(net, self.pool, self.config)
        self.prefill = ChunkedPrefill(net, self.config)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._cancel: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._urgent_streak = 0  # iterations in a row that ran only rows with deadlines
        self._full_step_s: float | None = None  # EWMA of iterations of every running row
        # One dedicated thread runs every forward: torch's grad mode and thread settings are
        # per-thread, and steps must not overlap anyway.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dllm-engine")
        # stats
        self._step_times: collections.deque[float] = collections.deque(
            maxlen=self.config.stats_window_steps)
        self._committed_log: collections.deque[tuple[float, int]] = collections.deque()
        self._capacity = 0.0
        # iteration time vs rows, tokens and attended context, fitted online: what the step
        # controller (deployments/slo.py) predicts each setting's latency from
        self._cost = StepCostModel()
        self._iterations = 0
        self._busy_s = 0.0  # total iteration time, and the part spent writing the cache
        self._cache_write_s = 0.0
        self._worker_s = 0.0
        self._window_start = float("inf")  # set by the first iteration

    # --- public API -----------------------------------------------------------------------
    async def start(self) -> None:
        self._ensure_started()

    def _ensure_started(self) -> None:
        """Start the scheduler loop on the running event loop (RuntimeError outside one)."""
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="dllm-engine")

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue a request and return its event stream. Raises ValueError for a request that can
        never be served (bad parameters, longer than the context, more KV than the whole pool),
        QueueFullError / EngineClosedError when it cannot be queued now."""
        if self._closing:
            raise EngineClosedError("the engine is shutting down")
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        # max_queued bounds the requests waiting for a slot: those that will take a free slot
        # at the next iteration are not waiting for one (every choice of a request is submitted
        # before the scheduler runs, so an idle engine must take max_num_seqs + max_queued)
        free = max(0, self.config.max_num_seqs - len(self._running))
        if self.config.max_queued is not None and \
                len(self._waiting) >= self.config.max_queued + free:
            raise QueueFullError(f"{len(self._waiting)} requests are already queued")
        self.loras.check_request(request.adapter)
        seq = (UniformSequence if self.uniform else Sequence).create(
            request, self.cfg, self.tokenizer, self.device)
        limit = self.config.max_uncached_full_attention_tokens
        if limit is not None and not seq.layout.block_causal and seq.full_cache == "none" \
                and seq.full_len > limit:
            raise ContextTooLongError(
                f"a full-attention row of {seq.full_len} tokens without the prefix/dual cache "
                f"is past this engine's limit of {limit} (max_uncached_full_attention_tokens)")
        if seq.cache_tokens_needed():
            pages = self._num_pages()
            need = -(-seq.cache_tokens_needed() // self.config.page_size)
            if need > pages:
                raise ContextTooLongError(
                    f"the request needs {need} KV pages ({seq.cache_tokens_needed()} tokens); "
                    f"this replica's pool has {pages} ({pages * self.config.page_size} tokens)")
            if self.pool is None:  # a full-attention model's first request with a cache
                self._create_pool()
        if request.latency_budget_s is not None:
            seq.deadline = seq.submitted_at + max(0.0, float(request.latency_budget_s))
        self._ensure_started()
        self._by_id[request.request_id] = seq
        self._queues[request.request_id] = asyncio.Queue()
        self._enqueue(seq)
        self._wake.set()
        return self._stream(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """The waiting queue: requests with a deadline first, earliest first; then the rest in
        arrival order."""
        if seq.deadline is None:
            self._waiting.append(seq)
            return
        at = next((i for i, s in enumerate(self._waiting)
                   if s.deadline is None or s.deadline > seq.deadline), len(self._waiting))
        self._waiting.insert(at, seq)

    # --- LoRA adapters (engine/adapters.py) ------------------------------------------------
    @property
    def lora(self) -> LoRABank | None:
        return self.loras.bank

    @property
    def adapter_reader(self):
        """(name, directory) -> AdapterWeights, for load_adapter (set by the model's loader)."""
        return self.loras.reader

    @adapter_reader.setter
    def adapter_reader(self, read) -> None:
        self.loras.reader = read

    def add_adapter(self, adapter: AdapterWeights) -> None:
        """Hold `adapter` under adapter.name (read by model/loaders/lora.read_adapter); it is
        put in a slot when a request first names it (EngineAdapters.add says what it raises)."""
        self.loras.add(adapter)

    def load_adapter(self, name: str, path: str) -> AdapterWeights:
        """Read the PEFT adapter in directory `path` (through `adapter_reader`) and hold it
        as `name`. Blocking file reads: call it off the event loop."""
        adapter = self.loras.read(name, path)
        self.loras.add(adapter)
        return adapter

    async def load_adapter_async(self, name: str, path: str) -> AdapterWeights:
        """load_adapter from the event loop: the files are read in a thread, the adapter is
        added on the loop (where admission changes the slots), never beside it."""
        adapter = await asyncio.to_thread(self.loras.read, name, path)
        self.loras.add(adapter)
        return adapter

    def remove_adapter(self, name: str) -> bool:
        """Forget adapter `name` (requests already admitted finish with it). -> whether it
        was held."""
        return self.loras.remove(name)

    def adapter_names(self) -> list[str]:
        return self.loras.names()

    def resident_adapters(self) -> list[str]:
        return self.loras.resident()

    def _num_pages(self) -> int:
        if self.uniform:
            return layered_num_pages(self.config, self.net, self.net_dtype_bytes)
        return self.config.num_pages(self.cfg, self.net_dtype_bytes)

    def _create_pool(self) -> None:
        pages = self._num_pages()
        if self.uniform:  # per-layer K/V shapes (sliding and global layers differ)
            self.pool = LayeredKVPool(self.net.kv_shapes, self.net.windows, pages,
                                      self.config.page_size, self.device, self.dtype)
            page_bytes = LayeredKVPool.page_bytes(self.net.kv_shapes, self.config.page_size,
                                                  self.net_dtype_bytes)
        else:
            self.pool = PagedKVPool(self.cfg, pages, self.config.page_size, self.device,
                                    self.dtype)
            page_bytes = self.config.page_bytes(self.cfg, self.net_dtype_bytes)
        if getattr(self, "runner", None) is not None:
            self.runner.pool = self.pool
        log.info("KV pool: %d pages of %d tokens = %d tokens (%.1f MiB, %d B per token)", pages,
                 self.config.page_size, pages * self.config.page_size, pages * page_bytes / 2**20,
                 page_bytes // self.config.page_size)

    @property
    def net_dtype_bytes(self) -> int:
        return self.dtype.itemsize

    async def cancel(self, request_id: str) -> None:
        self._cancel_nowait(request_id)

    @property
    def alive(self) -> bool:
        """False once the scheduler loop has ended (crashed or shut down)."""
        return self._task is None or not self._task.done()

    def forget_measurements(self) -> None:
        """Speed measured so far dropped (EngineBase.forget_measurements); the totals
        (iterations, busy time) stay. Call while the engine is idle."""
        self._full_step_s = None
        self._step_times.clear()
        self._committed_log.clear()
        self._capacity = 0.0
        self._cost = StepCostModel()

    def stats(self) -> EngineStats:
        """Load of this replica.

        token_backlog: work left in token-steps, i.e. the tokens that forward passes still have
        to process for every queued and running request: for each denoising step left, the
        tokens that step runs (the active block's length for block-causal models, prompt +
        canvas + suffix for full-attention ones, or the cached span at the steps of a block
        after its refresh with params.full_cache), plus the tokens still to be written to the KV
        cache (a queued request's prompt, each finished block but the last). It assumes every
        block takes all its steps and nothing stops early, so it is an upper bound; padding is
        not counted. capacity_token_steps_per_s: the same unit processed per second of step
        time (EWMA over iterations), so backlog / capacity estimates the seconds to drain.
        """
        now = time.perf_counter()
        self._trim_committed(now)
        # rate over the window (or since the first step, when that is more recent)
        span = max(min(self.config.stats_window_s, now - self._window_start), 1e-9)
        committed = sum(n for _, n in self._committed_log)
        seqs = list(self._waiting) + list(self._running)
        return EngineStats(
            queued=len(self._waiting),
            running=len(self._running),
            token_backlog=float(sum(s.backlog() for s in seqs)),
            step_latency_ms=1000.0 * (sum(self._step_times) / len(self._step_times))
            if self._step_times else 0.0,
            output_tokens_per_s=committed / span if committed else 0.0,
            capacity_token_steps_per_s=self._capacity,
            kv_pages_used=self.pool.used_pages if self.pool else 0,
            kv_pages_total=self.pool.num_pages if self.pool else 0,
            iterations=self._iterations,
            step_cost=self._cost.to_dict(),
            extra={"busy_s": self._busy_s,
                   "cache_write_s": self._cache_write_s, "worker_s": self._worker_s,
                   "max_num_seqs": self.config.max_num_seqs, "page_size": self.config.page_size,
                   **({"cuda_graphs": self.runner.static.stats()} if self.runner.static else {}),
                   **({"lora": self.loras.stats()} if self.lora is not None else {})},
        )

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting; let queued and running requests finish for up to drain_timeout_s;
        cancel what is left; stop the loop and the worker thread."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._waiting or self._running) and time.monotonic() < deadline \
                and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        for rid in [s.request_id for s in list(self._waiting) + self._running]:
            self._cancel_nowait(rid)
        if self._task is not None and not self._task.done():
            self._wake.set()
            while self._running and not self._task.done():  # the loop reaps at the next step
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for seq in list(self._running):  # the loop died with sequences in it
            self._deliver(seq, seq.abort("cancelled"))
            self._release(seq)
        self._executor.shutdown(wait=True)

    # --- the stream a caller iterates -----------------------------------------------------
    async def _stream(self, seq: Sequence) -> AsyncIterator[Event]:
        queue = self._queues[seq.request_id]
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # A consumer that stops iterating (client gone) or is cancelled frees its slot.
            if seq.state != DONE:
                self._cancel_nowait(seq.request_id)
            self._queues.pop(seq.request_id, None)

    def _deliver(self, seq: Sequence, event: Event) -> None:
        q = self._queues.get(seq.request_id)
        if q is not None:
            q.put_nowait(event)

    def _cancel_nowait(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is None or seq.state == DONE:
            return
        if seq.state == RUNNING:
            self._cancel.add(request_id)  # reaped between steps, never mid-forward
            if self._wake is not None:
                self._wake.set()
            return
        self._waiting.remove(seq)
        self._deliver(seq, seq.abort("cancelled"))
        self._by_id.pop(request_id, None)

    def _release(self, seq: Sequence) -> None:
        self.loras.release(seq)
        if self.pool is not None and seq.pages:
            self.pool.free(seq.pages)
            seq.pages = []
        self._by_id.pop(seq.request_id, None)
        self._cancel.discard(seq.request_id)

    # --- the scheduler loop ---------------------------------------------------------------
    def _reap_and_admit(self) -> None:
        if self._cancel:
            keep = []
            for seq in self._running:
                if seq.request_id in self._cancel:
                    self._deliver(seq, seq.abort("cancelled"))
                    self._release(seq)
                else:
                    keep.append(seq)
            self._running = keep
            self._cancel.clear()
        prefill = 0
        while self._waiting:
            seq = self._waiting[0]
            # a budgeted request may take a priority slot; the rest wait for one of max_num_seqs
            slots = self.config.max_num_seqs + (self.config.priority_slots
                                                if seq.deadline is not None else 0)
            if len(self._running) >= slots:
                break
            # a prompt prefilled in chunks costs this iteration one chunk, not its length
            cost = len(seq.prompt)
            if self.config.prefill_chunk_tokens is not None:
                cost = min(cost, self.config.prefill_chunk_tokens)
            if prefill and prefill + cost > self.config.max_prefill_tokens:
                break
            try:
                if not self.loras.acquire(seq):
                    break  # every adapter slot is held: the head waits, as for pages
            except UnknownAdapterError as e:  # removed while it waited
                self._waiting.popleft()
                self._deliver(seq, seq.abort("error", str(e)))
                self._by_id.pop(seq.request_id, None)
                continue
            pages: list[int] = []
            if seq.cache_tokens_needed():
                got = self.pool.allocate(self.pool.pages_for(seq.cache_tokens_needed()))
                if got is None:
                    self.loras.release(seq)
                    break  # FIFO: the head waits for pages; later requests do not overtake it
                pages = got
            self._waiting.popleft()
            seq.admit(pages)
            self._running.append(seq)
            prefill += cost

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap_and_admit()
            if not self._running:
                # idle (or the queue head cannot be admitted, which an empty pool rules out):
                # sleep until submit or cancel wakes us
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._step_batch()
            subset = len(batch) < len(self._running)
            t0 = time.perf_counter()
            try:
                runs = await loop.run_in_executor(self._executor, self._iterate_until_news, batch,
                                                  subset)
            except Exception as e:  # a bug outside the per-row isolation: fail this batch only
                log.exception("engine iteration failed")
                runs = [(t0, time.perf_counter(), _Iteration(
                    events=[(s, s.abort("error", f"{type(e).__name__}: {e}"))
                            for s in batch if s.state != DONE]))]
            for t_start, t_end, it in runs:
                self._record(t_start, t_end, it)
                if not subset:  # the pace a row with a deadline would share
                    dt = t_end - t_start
                    self._full_step_s = dt if self._full_step_s is None else \
                        0.7 * self._full_step_s + 0.3 * dt
                for seq, event in it.events:
                    self._deliver(seq, event)
            finished = [s for s in batch if s.state == DONE]
            if finished:
                for seq in finished:
                    self._release(seq)
                self._running = [s for s in self._running if s.state != DONE]

    def _step_batch(self) -> list[Sequence]:
        """The rows of the next iteration: every running row, or only those with a deadline
        when one of them would miss it at the pace of the full step (at most
        config.urgent_run such iterations in a row)."""
        urgent = [s for s in self._running if s.deadline is not None]
        if not urgent or len(urgent) == len(self._running) or self._full_step_s is None \
                or self._urgent_streak >= self.config.urgent_run:
            self._urgent_streak = 0
            return list(self._running)
        now = time.perf_counter()
        if not any(now + s.steps_left() * self._full_step_s > s.deadline for s in urgent):
            self._urgent_streak = 0
            return list(self._running)
        self._urgent_streak += 1
        return urgent

    def _record(self, t0: float, t1: float, it: _Iteration) -> None:
        dt = t1 - t0
        self._window_start = min(self._window_start, t0)
        self._iterations += 1
        self._busy_s += dt
        self._cache_write_s += it.cache_write_s
        self._worker_s += it.worker_s
        self._step_times.append(dt)
        self._committed_log.append((t0, it.committed))
        self._trim_committed(t1)
        if it.rows:
            self._cost.add(it.rows, it.token_steps, it.attn_kpairs, dt)
        rate = it.token_steps / max(dt, 1e-9)
        a = self.config.capacity_ewma
        self._capacity = rate if self._capacity == 0.0 else (1 - a) * self._capacity + a * rate

    def _trim_committed(self, now: float) -> None:
        while self._committed_log and now - self._committed_log[0][0] > self.config.stats_window_s:
            self._committed_log.popleft()

    # --- iterations, in the worker thread -------------------------------------------------
    def _iterate_until_news(self, batch: list[Sequence], once: bool = False
                            ) -> list[tuple[float, float, _Iteration]]:
        """Iterations of `batch` back to back while the loop has nothing to do between them:
        no event to deliver, no row finished, nothing queued or cancelled, not closing, and
        for at most ITERATE_FOR_S (once: a single iteration, a subset of the rows). Handing each iteration back to the event loop and out again
        cost 3-4% of a batch-1 iteration on the CPU (a block-causal answer emits text once per
        block, every `steps` iterations). -> (start, end, iteration) of each; the first
        iteration's exception propagates, a later one's ends the run (the next one meets it)."""
        runs: list[tuple[float, float, _Iteration]] = []
        t_first = time.perf_counter()
        while True:
            t0 = time.perf_counter() if runs else t_first
            try:
                it = self._iterate(batch)
            except Exception:
                if not runs:
                    raise
                return runs
            t1 = time.perf_counter()
            runs.append((t0, t1, it))
            # reads of containers the loop mutates: atomic under the GIL, and a stale answer
            # only means one more iteration before the loop's turn
            if once or it.events or self._waiting or self._cancel or self._closing \
                    or t1 - t_first >= ITERATE_FOR_S or any(s.state == DONE for s in batch):
                return runs

    def _iterate(self, batch: list[Sequence]) -> _Iteration:
        t_start = time.perf_counter()
        it = _Iteration()
        failed: dict[str, str] = {}
        with torch.no_grad():
            writes = [s for s in batch if s.pending_append is not None]
            # long writes go in chunks (engine/prefill.py): one chunk per iteration, the oldest
            # admitted first, beside everyone else's step
            in_chunks = [s for s in writes if self.prefill.applies(s)]
            chunked = in_chunks[:1]
            writes = [s for s in writes if not self.prefill.applies(s)]
            # attended pairs of this iteration, from the sequences' own counters (no tensors):
            # a row mid-way through a chunked prefill does not step, and writes one chunk (about
            # prefill_chunk_tokens of its write's tokens' work) or, behind another, nothing
            pending = {id(s) for s in in_chunks}
            it.attn_kpairs = (sum(_attn_pairs(s) for s in batch if id(s) not in pending) + sum(
                _attn_pairs(s, step=False) * min(1.0, self.config.prefill_chunk_tokens
                                                 / max(_write_len(s), 1))
                for s in chunked)) / 1000.0
            # a write past the largest length bucket goes alone: batched, every other row would
            # be padded to it, and a lone unpadded row attends unmasked (kv_pool's `unmasked`)
            top = self.config.length_buckets[-1]
            groups = [[s] for s in writes if _write_len(s) > top]
            short = [s for s in writes if _write_len(s) <= top]
            groups += [short] if short else []
            if writes or chunked:
                t0 = time.perf_counter()
                for group in groups:
                    for n, apply in self._isolated(group, self.runner.cache_write, failed):
                        it.token_steps += n
                        apply()
                for seq in chunked:
                    for n, apply in self._isolated(
                            [seq], lambda rows: self.prefill.chunk(rows[0], self.pool), failed):
                        it.token_steps += n
                        apply()
                it.cache_write_s = time.perf_counter() - t0
            # a sequence steps once its cache holds everything before its block (a chunked
            # prefill still in progress waits)
            stepping = [s for s in batch if s.request_id not in failed
                        and s.pending_append is None]
            it.rows = len(stepping)
            outcomes: dict[str, tuple[int, int]] = {}
            if stepping:
                for rows, (n, outcome, apply) in self._isolated_rows(stepping, self.runner.denoise,
                                                                     failed):
                    it.token_steps += n
                    apply()
                    for s, o in zip(rows, outcome, strict=True):
                        outcomes[s.request_id] = o
        for seq in batch:
            if seq.request_id in failed:
                it.events.append((seq, seq.abort("error", failed[seq.request_id])))
                continue
            if seq.request_id not in outcomes:
                continue
            masks_left, committed = outcomes[seq.request_id]
            it.committed += committed
            seq.committed += committed
            block_done = seq.after_step(masks_left)
            if seq.request.diffusing:
                it.events.append((seq, seq.canvas_event()))
            if block_done:
                it.events += [(seq, ev) for ev in seq.finish_block()]
        it.worker_s = time.perf_counter() - t_start
        return it

    def _isolated(self, rows, fn, failed):
        return [res for _, res in self._isolated_rows(rows, fn, failed)]

    def _isolated_rows(self, rows: list[Sequence], fn, failed: dict[str, str]):
        """fn(rows) for the batch; if it raises, fn([row]) for each row, recording failures."""
        try:
            return [(rows, fn(rows))]
        except Exception as e:
            if len(rows) == 1:
                log.exception("request %s failed", rows[0].request_id)
                failed[rows[0].request_id] = f"{type(e).__name__}: {e}"
                return []
            log.warning("batched forward failed (%s); retrying %d rows one by one", e, len(rows))
        out = []
        for s in rows:
            try:
                out.append(([s], fn([s])))
            except Exception as e:
                log.exception("request %s failed", s.request_id)
                failed[s.request_id] = f"{type(e).__name__}: {e}"
        return out


def _write_len(seq: Sequence) -> int:
    start, end = seq.pending_append
    return end - start


def _attn_pairs(seq: Sequence, step: bool = True) -> int:
    """(query, key) pairs this iteration's forwards attend for one sequence: its pending cache
    write over what is cached before it, then (step) its denoising step (block-causal: the
    active block over the cache and itself; full attention: the whole row, or the cached span
    over the row)."""
    pairs = 0
    if seq.pending_append is not None:
        lo, hi = seq.pending_append
        pairs += (hi - lo) * hi
    if not step:
        return pairs
    lo, hi = seq.block_span()
    if seq.layout.block_causal:
        head = seq.block_head  # blocks aligned to 0: the prompt's tail runs with block 0
        cached = len(seq.prompt) + lo - head
        return pairs + (hi - lo + head) * (cached + hi - lo + head)
    n = seq.full_len
    if seq.full_cache == "none" or seq.refreshing:
        return pairs + n * n
    q0, q1 = seq.cached_span()
    return pairs + (q1 - q0) * n
