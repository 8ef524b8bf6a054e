"""One paged pool of K/V for the clean tokens of every running sequence (vLLM-style).

    pool = PagedKVPool(cfg, num_pages=512, page_size=16, device=dev, dtype=torch.float32)
    pages = pool.allocate(pool.pages_for(n_tokens))       # None when the pool is full
    ctx = pool.context(page_tables, cached_lens, query_valid, append=True)
    net(ids, positions=pos, t=zeros, attn=ctx)            # attends to cache + new, stores new
    pool.free(pages)

Storage is flat token slots: slot = page * page_size + offset, tensors [n_layers, slots, Hkv, hd],
so a sequence's cache is wherever its page table points and freeing is returning page numbers.
Each forward, `attend` runs one of the two paths kernels/attention.py decides between:
- varlen (flash-attn installed, CUDA, fp16/bf16; eager shapes only): the keys row b sees, its
  cached_lens[b] cached tokens then its valid new tokens, are read from the pool straight into
  one packed buffer of sum(cached_lens) + B * Lq + 1 rows (host-known, no sync; the slot of
  every packed row is computed once per context), the new keys copied in, and
  `varlen_attention` runs flash_attn_varlen_func on it;
- masked SDPA (otherwise, and always with a `window`, the CUDA-graph static shapes): the rows'
  cached slots are gathered into a dense [B, Hkv, S, hd] view (S = the longest cache in the
  batch, or the window >= it), the new keys appended, and a mask hides the short rows' tails
  and the padding keys.
A context of one row whose queries are all valid (`query_lens`, host ints) and whose cache is all
visible (a lone prefill or chunked-prefill write) attends unmasked: no [1, 1, n, n] mask, which
SDPA on the CPU would materialise (4.4 GB at n = 32k).
A paged-attention kernel reading the pages in place would save the gather.
The semantics are model/cache.py's KVCache (the reference): cached tokens and the valid new
tokens are all visible to every new query, and `append` stores the valid new tokens in order.
`hidden` takes a per-row range of cached slots out of view (KVCache's `hide`): the full-attention
dual cache (engine/batch.py) keeps the prefix and the suffix of a row and hides its stale block,
so a row's visible cached keys need not be contiguous; both paths pack or mask by key_valid.
"""

from __future__ import annotations

import math

import torch

from kernels.attention import attention, use_varlen, varlen_attention
from model.config import ModelConfig


class PagedKVPool:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.cfg, self.num_pages, self.page_size = cfg, num_pages, page_size
        self.n_layers = cfg.n_layers
        shape = (cfg.n_layers, num_pages * page_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [layers, slots, Hkv, hd]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low page numbers first

    # --- pages ----------------------------------------------------------------------------
    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    # --- attention ------------------------------------------------------------------------
    def context(self, page_tables: list[list[int]], cached_lens: list[int],
                query_valid: torch.Tensor, append: bool,
                window: int | None = None,
                hidden: list[tuple[int, int]] | None = None,
                query_lens: list[int] | None = None,
                chunk_blocks: list[int] | None = None) -> PagedAttention:
        return PagedAttention(self, page_tables, cached_lens, query_valid, append, window, hidden,
                              query_lens, chunk_blocks)


class PagedAttention:
    """AttentionContext over the pool for one batched forward.

    page_tables[b]: the pages of row b (enough for its cache plus what `append` stores);
    cached_lens[b]: tokens already cached; query_valid: bool [B, Lq], False for padding;
    window: keys read per row (>= the longest cache; None = exactly that), the tail masked, so
    the shapes stay static across steps for CUDA graphs (engine/cuda_graphs.py);
    chunk_blocks: per row, a block length: the new tokens (at positions cached_len ..) attend
    block-causally among themselves, a key seen when its block (position // length) is not
    after the query's (the block-causal prefill of a prompt whose blocks are aligned to
    position 0); 0 = all of them, as without it. It takes the masked path.
    hidden: per row, cached slots [start, end) the queries do not see (read-only contexts). A context with
    a window always takes the masked SDPA path: a graph binds only read_slots and key_valid,
    and the varlen path's packed sizes change with the lengths. Otherwise the path is
    kernels.attention.use_varlen's (the same for a tensor-parallel follower, which rebuilds
    the context from the same args).
    Index tensors are built once (the varlen ones on first use) and reused by every layer."""

    def __init__(self, pool: PagedKVPool, page_tables: list[list[int]], cached_lens: list[int],
                 query_valid: torch.Tensor, append: bool, window: int | None = None,
                 hidden: list[tuple[int, int]] | None = None,
                 query_lens: list[int] | None = None,
                 chunk_blocks: list[int] | None = None):
        if hidden is not None and append:
            raise ValueError("hidden cached slots are for read-only contexts")
        self.pool, self.append = pool, append
        # what pool.context() was given: a tensor-parallel follower rebuilds the same context
        # over its own pool from these (engine/tensor_parallel.py)
        self.args = dict(page_tables=page_tables, cached_lens=cached_lens,
                         query_valid=query_valid, append=append, window=window,
                         hidden=hidden, query_lens=query_lens, chunk_blocks=chunk_blocks)
        dev = query_valid.device
        B, Lq = query_valid.shape
        ps = pool.page_size
        S = max(cached_lens, default=0)
        if window is not None:
            if window < S:
                raise ValueError(f"window {window} is shorter than the longest cache ({S})")
            S = window
        n_pages = max(1, max((len(t) for t in page_tables), default=1))
        table = torch.tensor([t + [0] * (n_pages - len(t)) for t in page_tables],
                             dtype=torch.long, device=dev)  # [B, n_pages]
        lens = torch.tensor(cached_lens, dtype=torch.long, device=dev)  # [B]
        j = torch.arange(S, device=dev)
        # gather index of every cached key: [B, S] slots (unused tails point at a row's page 0)
        self.read_slots = (table[:, (j // ps).clamp(max=n_pages - 1)] * ps + j % ps).reshape(-1)
        self.S, self.B, self.Lq = S, B, Lq
        self.lens, self.query_valid = lens, query_valid
        self.varlen = window is None
        # One row whose every query is valid (query_lens, host ints, says so) and whose whole
        # cache is visible: nothing to mask, so SDPA runs unmasked. That is what makes a long
        # prefill affordable on the CPU: at 32k tokens the masked call took 27 s and 4.4 GB
        # against 4.8 s and 0.25 GB unmasked (1 thread, 2 heads of 16, measured).
        self.unmasked = (B == 1 and window is None and hidden is None
                         and query_lens is not None and list(query_lens) == [Lq])
        self.max_keys = max(cached_lens, default=0) + Lq  # host bounds for the varlen path
        self.total_keys = sum(cached_lens) + B * Lq
        self._varlen_plan: tuple | None = None
        cached = j[None, :] < lens[:, None]  # [B, S]
        if hidden is not None:
            h = torch.tensor(hidden, dtype=torch.long, device=dev).view(B, 2)
            cached &= ~((j[None, :] >= h[:, :1]) & (j[None, :] < h[:, 1:]))
        self.key_valid = torch.cat([cached, query_valid], dim=1)  # [B, S + Lq]
        self._chunk_mask = None
        if chunk_blocks is not None and any(chunk_blocks):
            bl = torch.tensor(chunk_blocks, dtype=torch.long, device=dev)  # [B]
            blk = (lens[:, None] + torch.arange(Lq, device=dev)) // bl.clamp_min(1)[:, None]
            sees = (blk[:, None, :] <= blk[:, :, None]) | (bl == 0)[:, None, None]  # [B, Lq, Lq]
            self._chunk_mask = torch.cat(
                [cached[:, None, :].expand(B, Lq, S), query_valid[:, None, :] & sees], 2)[:, None]
            self.varlen = self.unmasked = False  # a per-query key mask: the masked SDPA path
        if append:
            # valid new tokens of row b go to cache positions lens[b] .. lens[b] + n_b - 1
            pos = lens[:, None] + query_valid.long().cumsum(1) - 1  # [B, Lq]
            rows, cols = query_valid.nonzero(as_tuple=True)
            p = pos[rows, cols]
            reserved = torch.tensor([len(t) * ps for t in page_tables], device=dev)  # [B]
            if bool((p >= reserved[rows]).any()):
                raise RuntimeError("paged KV append past a sequence's reserved pages")
            self.write_rows, self.write_cols = rows, cols
            self.write_slots = table[rows, p // ps] * ps + p % ps

    @property
    def mask(self) -> torch.Tensor:
        """bool [B, 1, Lq, S + Lq]: a view of key_valid (a graph's static buffer stays the one
        read)."""
        if self._chunk_mask is not None:
            return self._chunk_mask  # [B, 1, Lq, S + Lq]
        B, K = self.key_valid.shape
        return self.key_valid[:, None, None, :].expand(B, 1, K - self.S, K)

    def varlen_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each key goes in the packed buffer, row b at cu[b] .. cu[b+1]-1 holding its
        visible cached tokens (in slot order, skipping hidden ones) then its valid new ones:
        (cu int32 [B + 1], slots long [total_keys + 1]: the pool slot each packed row is read
        from (new-token rows and the dump row last: slot 0, overwritten or never read), new_dest long [B * Lq]: the packed row of each new
        token (padding: the dump row total_keys)). No host sync: totals are host bounds."""
        if self._varlen_plan is None:
            B, S, total = self.B, self.S, self.total_keys
            qv = self.query_valid
            cached = self.key_valid[:, :S]  # [B, S]: not always a prefix (hidden slots)
            n_cached = cached.sum(1)  # [B]
            cu = torch.zeros(B + 1, dtype=torch.int32, device=qv.device)
            cu[1:] = (n_cached + qv.sum(1)).cumsum(0)
            start = cu[:-1].long()[:, None]  # [B, 1]
            cached_rank = cached.long().cumsum(1) - 1  # [B, S]
            cached_dest = torch.where(cached, start + cached_rank, total)  # [B, S]
            slots = torch.zeros(total + 1, dtype=torch.long, device=qv.device)
            slots.scatter_(0, cached_dest.reshape(-1), self.read_slots)
            rank = qv.long().cumsum(1) - 1  # [B, Lq]
            new_dest = torch.where(qv, start + n_cached[:, None] + rank, total).reshape(-1)
            self._varlen_plan = (cu, slots, new_dest)
        return self._varlen_plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H, Lq, hd]; k, v: [B, Hkv, Lq, hd] of the new tokens (rotary applied)."""
        pool, B, S, Lq = self.pool, self.B, self.S, self.Lq
        Hkv, hd = k.shape[1], k.shape[3]
        if self.varlen and use_varlen(q):
            cu, slots, new_dest = self.varlen_plan()
            # [total_keys + 1, Hkv, hd]: cached keys read straight into their packed rows
            k_packed = pool.k[layer].index_select(0, slots).to(k.dtype)
            v_packed = pool.v[layer].index_select(0, slots).to(v.dtype)
            k_packed.index_copy_(0, new_dest, k.transpose(1, 2).reshape(B * Lq, Hkv, hd))
            v_packed.index_copy_(0, new_dest, v.transpose(1, 2).reshape(B * Lq, Hkv, hd))
            out = varlen_attention(q, k_packed, v_packed, cu, self.max_keys, self.query_valid)
        else:
            k_cached = pool.k[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
            v_cached = pool.v[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
            k_all = torch.cat([k_cached.transpose(1, 2).to(k.dtype), k], dim=2)  # [B, Hkv, S+Lq, hd]
            v_all = torch.cat([v_cached.transpose(1, 2).to(v.dtype), v], dim=2)
            out = attention(q, k_all, v_all, None if self.unmasked else self.mask)
        if self.append:
            new_k = k.transpose(1, 2)[self.write_rows, self.write_cols]  # [n_valid, Hkv, hd]
            new_v = v.transpose(1, 2)[self.write_rows, self.write_cols]
            pool.k[layer].index_copy_(0, self.write_slots, new_k.to(pool.k.dtype))
            pool.v[layer].index_copy_(0, self.write_slots, new_v.to(pool.v.dtype))
        return out
