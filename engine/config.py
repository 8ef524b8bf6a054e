"""Engine limits and shapes: one dataclass, every default with its reason.

    EngineConfig(max_num_seqs=16, kv_cache_bytes=256 << 20)   # memory budget in bytes
    EngineConfig(kv_pages=512, page_size=16)                  # ... or in pages
    EngineConfig(prefill_chunk_tokens=2048)                   # long prompts prefilled in chunks
    EngineConfig(cuda_graphs=True)                            # denoise forwards from CUDA graphs

The KV pool holds the clean tokens (prompt, finished blocks) of the running sequences of a
block-causal model, or, for a full-attention model, the refresh-time K/V of every token of the
rows that use the approximate prefix/dual cache (SamplingParams.full_cache; the pool is made
with the first such request). A request reserves the pages for its whole prompt and answer when
it is admitted, so a running sequence never runs out of cache and nothing has to be preempted;
what does not fit waits in the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import ModelConfig


@dataclass
class EngineConfig:
    # Sequences in the step batch. 16 is the largest batch benchmarks/bench_engine.py runs; on the
    # 2-core CPU a [16, 32]-token step of tiny-coder takes ~90 ms (1 thread), so more would only
    # add latency. A GPU replica raises it (64 to 256).
    max_num_seqs: int = 16
    # Tokens per KV page. 16 as in vLLM: small enough that a request wastes < 16 slots per
    # sequence, large enough that page tables stay short.
    page_size: int = 16
    # Memory budget of the KV pool, in pages or bytes (pages win when both are set). Neither:
    # room for max_num_seqs sequences of the model's full context, so only max_num_seqs limits
    # admission.
    kv_pages: int | None = None
    kv_cache_bytes: int | None = None
    # Prompt tokens prefilled per scheduler iteration (at least one prompt always goes in): a
    # burst of long prompts is spread over a few steps instead of stalling everyone's next step.
    max_prefill_tokens: int = 4096
    # Chunked prefill: a prompt (or finished block) longer than this is written to the KV cache
    # over several iterations, a group of layers at a time (~prefill_chunk_tokens x n_layers
    # token-layers each, at least one layer), alongside the other rows' denoising step, so one
    # long prompt does not stall every running stream (engine/prefill.py says why layers, not
    # token ranges: the prompt is one bidirectional segment; families with blocks aligned to
    # position 0 take whole-block token chunks of about this size). None: one pass, as before.
    prefill_chunk_tokens: int | None = None
    # Full-attention rows without the prefix/dual cache (SamplingParams.full_cache) run prompt +
    # canvas + suffix at every step; longer rows are refused (413 at the ingress, naming the
    # limit) and must use the cache. None: only the context limits them.
    max_uncached_full_attention_tokens: int | None = None
    # Requests waiting for a slot; None = unbounded. When full, submit raises QueueFullError
    # (the server answers 503 with Retry-After). 256: sixteen times the default batch, ~90 s
    # of tiny-coder work on the 2-core CPU; past that a client is better told to come back.
    max_queued: int | None = 256
    # Rows beyond max_num_seqs that only requests with a latency budget may take
    # (GenerationRequest.latency_budget_s): under a burst every slot is held and the queue is
    # long, and an IDE's inline completion that waited for a slot would miss its budget
    # however few steps it took. Budgeted requests are also admitted first, earliest deadline
    # first. 2: each extra row makes everyone's step ~1/16 longer at the default batch.
    priority_slots: int = 2
    # A row with a deadline that would miss it sharing the full step (steps left x the recent
    # iteration time past the deadline) gets iterations of its own: the rows with deadlines
    # step alone, a small fast forward, at most this many iterations in a row before everyone
    # steps once (so the others slow down, never stop). 0: deadlines only order admission.
    urgent_run: int = 4
    # Graph mode (cuda_graphs): query lengths are padded up to one of these (then to a multiple
    # of the largest), so the graphs see few distinct shapes: block lengths 1..32 fall on 5.
    # Eager forwards are not padded (engine/batch.py StepRunner._lengths): static shapes are
    # only worth their padding where a graph is replayed.
    length_buckets: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128, 256)
    # Batch sizes are padded up to one of these with dummy rows. Empty = no padding: on a CPU a
    # dummy row costs as much as a real one. With cuda_graphs, empty means graph_batch_buckets().
    batch_buckets: tuple[int, ...] = ()
    # Windows of the stats: step latency over the last N iterations, output tok/s over seconds.
    stats_window_steps: int = 32
    stats_window_s: float = 10.0
    # Weight of the newest measurement in the capacity EWMA (token-steps per second).
    capacity_ewma: float = 0.2
    # Run the denoising forward at static shapes (rows, query length, cache window and logits
    # rows rounded up to buckets) and, on CUDA, replay it from a CUDA graph captured per shape on
    # first use (engine/cuda_graphs.py): one launch instead of ~25 per layer, which is most of a
    # small batch's step on a GPU. Off by default: padding costs real work on a CPU, and each new
    # shape pays a capture (~3 forwards) once. On a CPU, True runs the same padded path without
    # capture (how the tests pin it to the eager path). Cache writes stay eager.
    cuda_graphs: bool = False
    # Graph mode: the cache window each row reads is rounded up to a multiple of this many keys,
    # the extra ones masked. 256 as in benchmarks/gpu_decode.py: at LLaDA-8B shapes <= 255
    # extra keys read ~1% of a batch-1 forward's bytes (weights dominate), and a 4096-token
    # context needs 16 windows.
    graph_window: int = 256
    # Graph mode: most graphs captured; a shape past that runs its static shape uncaptured.
    # Bounds capture time and graph memory: ~256 keys covers block 32 at 12 row buckets, the
    # 5 logits-row buckets and 4 windows (1000-token contexts) with room to spare.
    max_graphs: int = 256

    # LoRA adapters resident at once (model/lora.py slots; 0: no adapter support, no hooks) and
    # the largest rank a slot holds. Each slot costs max_lora_rank * (in + out) per Linear:
    # tiny-coder at rank 16, 1.6 MB per slot in float32. 4 as vLLM's default max_loras; a
    # request whose adapter is not resident waits for a slot no running row holds (LRU evicted).
    max_loras: int = 0
    max_lora_rank: int = 16

    def num_pages(self, cfg: ModelConfig, dtype_bytes: int) -> int:
        if self.kv_pages is not None:
            return int(self.kv_pages)
        if self.kv_cache_bytes is not None:
            return int(self.kv_cache_bytes // self.page_bytes(cfg, dtype_bytes))
        return self.max_rows * math.ceil(cfg.max_seq_len / self.page_size)

    @property
    def max_rows(self) -> int:
        """The most sequences a step runs: max_num_seqs plus the priority slots."""
        return self.max_num_seqs + self.priority_slots

    def page_bytes(self, cfg: ModelConfig, dtype_bytes: int) -> int:
        """K and V of every layer for page_size tokens."""
        return self.page_size * kv_bytes_per_token(cfg, dtype_bytes)

    def kv_tokens(self, cfg: ModelConfig, dtype_bytes: int) -> int:
        """Tokens the KV pool holds (pages x page_size): what admission reserves from."""
        return self.num_pages(cfg, dtype_bytes) * self.page_size

    def validate(self) -> EngineConfig:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.priority_slots < 0 or self.urgent_run < 0:
            raise ValueError("priority_slots and urgent_run must be >= 0")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if not self.length_buckets or sorted(self.length_buckets) != list(self.length_buckets):
            raise ValueError("length_buckets must be a non-empty increasing tuple")
        if self.batch_buckets and sorted(self.batch_buckets) != list(self.batch_buckets):
            raise ValueError("batch_buckets must be increasing")
        if any(b < 1 for b in (*self.length_buckets, *self.batch_buckets)):
            raise ValueError("buckets must be >= 1")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank >= 1")
        if self.graph_window < 1:
            raise ValueError("graph_window must be >= 1")
        if self.max_graphs < 0:
            raise ValueError("max_graphs must be >= 0")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1 (or None: one pass)")
        if self.max_uncached_full_attention_tokens is not None and \
                self.max_uncached_full_attention_tokens < 1:
            raise ValueError("max_uncached_full_attention_tokens must be >= 1 (or None)")
        return self

    def graph_batch_buckets(self) -> tuple[int, ...]:
        """Row buckets of graph mode: batch_buckets when given, else 1, 2, 4, 8, 16 and then
        every 16 up to max_num_seqs, max_num_seqs itself and max_rows (the priority slots on
        top). Past 16 rows a step is no longer launch-bound, and a step of 16 keeps padding
        under 50% with ~max_num_seqs / 16 shapes instead of one per batch size."""
        if self.batch_buckets:
            return self.batch_buckets
        out = [b for b in (1, 2, 4, 8, 16) if b < self.max_num_seqs]
        out += list(range(32, self.max_num_seqs, 16))
        out.append(self.max_num_seqs)
        return tuple(out + ([self.max_rows] if self.max_rows > self.max_num_seqs else []))


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x kv heads x head dim x dtype bytes
    (tiny-coder fp32: 2 x 5 x 2 x 64 x 4 = 5 KiB; LLaDA-8B bf16: 2 x 32 x 32 x 128 x 2 = 512 KiB)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of the largest."""
    if not buckets:
        return n
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return math.ceil(n / top) * top
