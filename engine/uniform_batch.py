"""The batched forwards of a uniform-diffusion model (DiffusionGemma) over the paged KV pool.

    pool = LayeredKVPool(net.kv_shapes, net.windows, num_pages, page_size, device, dtype)
    runner = UniformStepRunner(net, pool, engine_config)
    n, apply = runner.cache_write(seqs)         # causal encode of prompts / finished canvases
    n, outcome, apply = runner.denoise(seqs)    # one denoising step of every row's canvas

The same contract as engine/batch.py's StepRunner (compute first, touch sequence state only in
`apply`, so the engine can retry a failed batch row by row), for the other diffusion process:
- cache_write: the pending prompt or finished canvas of every row, encoded causally (the
  encoder), writing its K/V into the row's pages. Rows are right-padded; pad tokens are neither
  attended nor stored.
- denoise: every row's whole canvas [B, C] (C is the model's canvas length: the same for every
  row, so no padding) through the bidirectional decoder over the row's cache, read-only, with
  each row's self-conditioning state (zeros for rows at a canvas's first step: exactly "no
  signal", model/diffusion_gemma.py); then model/uniform.uniform_step with each row's own
  temperature (its step of its own max_denoising_steps), entropy bound and torch.Generator, and
  each row's adaptive stopping. This is the reference sampler's step, which is why a request's
  tokens are the same whatever runs beside it (tests/engine/test_uniform_engine.py).

The pool: DiffusionGemma's layers differ in K/V heads and head_dim (sliding 8 x 256, global
2 x 512 in the 26B model), so LayeredKVPool keeps one [slots, Hkv, hd] tensor per layer under the
same page tables; attention masks come from model/diffusion_gemma.gemma_mask (causal + sliding
window for the encoder, bidirectional with the last W - 1 cached keys in sliding layers for the
decoder). Sliding layers keep every token like the global ones (a ring buffer of W would save
their memory: future work), and attention is masked SDPA (no varlen flash path for these
masks yet), with per-layer shapes gathered from the pages each step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.kv_pool import PagedAttention, PagedKVPool
from model.diffusion_gemma import causal_prefill, gemma_attention, gemma_mask, sliding_prefill
from model.lora import find_bank
from model.uniform import is_stable, push_history, step_temperature, uniform_step

log = logging.getLogger(__name__)


class LayeredKVPool(PagedKVPool):
    """PagedKVPool with its own K/V shape per layer: pages and page tables as the parent's."""

    def __init__(self, kv_shapes: list[tuple[int, int]], windows: list[int | None],
                 num_pages: int, page_size: int, device=None, dtype: torch.dtype = torch.float32):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.cfg = None
        self.num_pages, self.page_size = num_pages, page_size
        self.n_layers = len(kv_shapes)
        self.windows = list(windows)
        slots = num_pages * page_size
        self.k = [torch.zeros(slots, h, d, device=device, dtype=dtype) for h, d in kv_shapes]
        self.v = [torch.zeros_like(t) for t in self.k]
        self._free = list(range(num_pages - 1, -1, -1))

    @staticmethod
    def page_bytes(kv_shapes: list[tuple[int, int]], page_size: int, dtype_bytes: int) -> int:
        return 2 * page_size * dtype_bytes * sum(h * d for h, d in kv_shapes)

    def context(self, page_tables, cached_lens, query_valid, append, window=None, hidden=None,
                causal: bool = False, all_valid: bool = False, **_) -> LayeredAttention:
        """all_valid: the caller knows every query is valid (host-side: no sync to check)."""
        if window is not None or hidden is not None:
            raise ValueError("the layered pool has no static windows or hidden slots")
        return LayeredAttention(self, page_tables, cached_lens, query_valid, append, causal,
                                all_valid)


class LayeredAttention(PagedAttention):
    """One batched forward's view of the layered pool: the parent's page-table indexing, the
    per-layer shapes and model/diffusion_gemma's masks (causal: the encoder, which also stores
    the valid new tokens; otherwise the read-only decoder)."""

    def __init__(self, pool: LayeredKVPool, page_tables, cached_lens, query_valid, append: bool,
                 causal: bool, all_valid: bool = False):
        super().__init__(pool, page_tables, cached_lens, query_valid, append)
        self.causal = causal
        # a prompt's prefill (empty cache, every query valid): unmasked causal SDPA where the
        # window does not cut (model/diffusion_gemma.causal_prefill)
        self.prefill = causal and all_valid and max(cached_lens, default=0) == 0
        self._masks: dict[int | None, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, B, S = self.pool, self.B, self.S
        Hkv, hd = k.shape[1], k.shape[3]
        w = pool.windows[layer]
        if self.prefill:  # no mask over the whole prompt (model/diffusion_gemma.py)
            out = causal_prefill(q, k, v) if w is None or self.Lq <= w \
                else sliding_prefill(q, k, v, w)
            self._store(layer, k, v)
            return out
        if w not in self._masks:
            self._masks[w] = gemma_mask(w, self.causal, self.key_valid[:, :S], self.lens,
                                        self.query_valid)
        k_cached = pool.k[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
        v_cached = pool.v[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
        k_all = torch.cat([k_cached.transpose(1, 2).to(k.dtype), k], dim=2)  # [B, Hkv, S+Lq, hd]
        v_all = torch.cat([v_cached.transpose(1, 2).to(v.dtype), v], dim=2)
        out = gemma_attention(q, k_all, v_all, self._masks[w])
        self._store(layer, k, v)
        return out

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The valid new tokens' K/V into their slots (encoder calls only)."""
        if not self.append:
            return
        pool = self.pool
        new_k = k.transpose(1, 2)[self.write_rows, self.write_cols]  # [n_valid, Hkv, hd]
        new_v = v.transpose(1, 2)[self.write_rows, self.write_cols]
        pool.k[layer].index_copy_(0, self.write_slots, new_k.to(pool.k[layer].dtype))
        pool.v[layer].index_copy_(0, self.write_slots, new_v.to(pool.v[layer].dtype))


class UniformStepRunner:
    """engine/batch.StepRunner's interface for uniform-diffusion rows (module docstring)."""

    def __init__(self, net: torch.nn.Module, pool: LayeredKVPool | None, econf: EngineConfig):
        if not hasattr(net, "denoise"):  # e.g. engine/tensor_parallel.py's TPLeader
            raise ValueError("uniform-diffusion models (DiffusionGemma) run on one device in the "
                             "engine: tensor_parallel_size > 1 is not wired for them yet")
        if econf.cuda_graphs:
            log.warning("cuda_graphs: no static-shape path for uniform diffusion yet; eager")
        self.net, self.pool, self.econf = net, pool, econf
        self.lora = find_bank(net)
        self.cfg = net.cfg
        self.device = next(net.parameters()).device
        self.static = None  # no CUDA-graph path for this family yet
        self.fill_id = self.cfg.pad_id if self.cfg.pad_id is not None else 0

    # --- cache writes: the causal encoder ---------------------------------------------------
    def cache_write(self, seqs) -> tuple[int, Callable[[], None]]:
        dev, B = self.device, len(seqs)
        chunks = [s.append_ids() for s in seqs]
        lens = [len(c) for c in chunks]
        L = max(lens)
        ids = torch.full((B, L), self.fill_id, dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            ids[i, :lens[i]] = torch.tensor(c, dtype=torch.long, device=dev)
        start = torch.tensor([s.pending_append[0] for s in seqs], device=dev)
        ar = torch.arange(L, device=dev)
        pos = start[:, None] + ar  # [B, L]
        valid = ar[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, L]
        ctx = self.pool.context([s.pages for s in seqs], [s.cached_len for s in seqs], valid,
                                append=True, causal=True, all_valid=len(set(lens)) == 1)
        if self.lora is not None:  # each row's LoRA adapter slot (model/lora.py)
            self.lora.set_rows([s.lora_slot for s in seqs])
        self.net.encode(ids, pos, ctx)

        def apply() -> None:
            for s, n in zip(seqs, lens, strict=True):
                s.cached_len += n
                s.pending_append = None

        return sum(lens), apply

    # --- one denoising step: the bidirectional decoder + the uniform sampler ------------------
    def denoise(self, seqs) -> tuple[int, list[tuple[int, int]], Callable[[], None]]:
        """-> (tokens processed, [(1 while the canvas goes on / 0 when it is done, tokens
        committed)] per row, apply). A batch that fails leaves every row's generator as it
        was, so the engine's row-by-row retry draws what the batch would have."""
        saved = [s.generator.get_state() for s in seqs]
        try:
            return self._denoise(seqs)
        except Exception:
            for s, state in zip(seqs, saved, strict=True):
                s.generator.set_state(state)
            raise

    def _denoise(self, seqs):
        dev, B = self.device, len(seqs)
        C = self.net.shape.canvas_length
        spans = [s.block_span() for s in seqs]
        ids = torch.stack([s.canvas[lo:lo + C] for s, (lo, _) in zip(seqs, spans, strict=True)])
        start = torch.tensor([len(s.prompt) + lo for s, (lo, _) in zip(seqs, spans, strict=True)],
                             device=dev)
        pos = start[:, None] + torch.arange(C, device=dev)  # [B, C]
        valid = torch.ones(B, C, dtype=torch.bool, device=dev)
        sc = None
        if any(s.self_cond is not None for s in seqs):  # zeros: a canvas's first step
            zero = torch.zeros(C, self.cfg.d_model, device=dev,
                               dtype=self.net.tok_embeddings.weight.dtype)
            sc = torch.stack([s.self_cond if s.self_cond is not None else zero for s in seqs])
        ctx = self.pool.context([s.pages for s in seqs], [s.cached_len for s in seqs], valid,
                                append=False)
        if self.lora is not None:
            self.lora.set_rows([s.lora_slot for s in seqs])
        logits = self.net.denoise(ids, pos, ctx, sc)  # [B, C, V]
        u = [s.uniform for s in seqs]

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        n_steps = col([x.max_denoising_steps for x in u], torch.int32)
        steps_left = col([x.max_denoising_steps - s.step for x, s in zip(u, seqs, strict=True)],
                         torch.int32)
        temp = step_temperature(steps_left, n_steps, col([x.t_min for x in u]),
                                col([x.t_max for x in u]))
        out = uniform_step(logits, ids, temp, col([x.entropy_bound for x in u]),
                           [s.generator for s in seqs])
        new_sc = self.net.soft_embedding(out.scaled)  # [B, C, d]: the next step's signal
        # adaptive stopping, per row (its own history length and thresholds)
        stop, histories = [], []
        for i, (s, x) in enumerate(zip(seqs, u, strict=True)):
            if x.confidence_threshold is None:
                stop.append(torch.zeros((), dtype=torch.bool, device=dev))
                histories.append(s.history)
                continue
            h = s.history[None]
            stop.append(is_stable(h, out.argmax[i:i + 1])[0]
                        & (out.mean_entropy[i] < x.confidence_threshold))
            histories.append(push_history(h, out.argmax[i:i + 1])[0])
        stopped = torch.stack(stop).tolist()  # one host sync a step: is each canvas done?
        done = [bool(st) or s.step + 1 >= x.max_denoising_steps
                for st, s, x in zip(stopped, seqs, u, strict=True)]
        committed = [min(C, s.params.max_new_tokens - lo) if d else 0
                     for d, s, (lo, _) in zip(done, seqs, spans, strict=True)]
        outcome = [(0 if d else 1, n) for d, n in zip(done, committed, strict=True)]

        def apply() -> None:
            for i, (s, (lo, _)) in enumerate(zip(seqs, spans, strict=True)):
                s.history = histories[i]
                if done[i]:  # the canvas's answer is the last argmax; its state is dropped
                    s.canvas[lo:lo + C] = out.argmax[i]
                    s.accepted = None
                    s.self_cond = None
                else:
                    s.canvas[lo:lo + C] = out.canvas[i]
                    s.accepted = out.accepted[i]
                    s.self_cond = new_sc[i]

        return B * C, outcome, apply


def layered_num_pages(econf: EngineConfig, net, dtype_bytes: int) -> int:
    """EngineConfig.num_pages for a layered pool: kv_pages, else kv_cache_bytes over the
    per-layer page size, else max_num_seqs full contexts (set kv_cache_bytes for a real model:
    DiffusionGemma's 131k context would ask for hundreds of GB)."""
    if econf.kv_pages is not None:
        return int(econf.kv_pages)
    if econf.kv_cache_bytes is not None:
        return int(econf.kv_cache_bytes
                   // LayeredKVPool.page_bytes(net.kv_shapes, econf.page_size, dtype_bytes))
    return econf.max_rows * -(-net.cfg.max_seq_len // econf.page_size)
