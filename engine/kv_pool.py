"""One paged pool of K/V for the clean tokens of every running sequence (vLLM-style).

    pool = PagedKVPool(cfg, num_pages=512, page_size=16, device=dev, dtype=torch.float32)
    pages = pool.allocate(pool.pages_for(n_tokens))       # None when the pool is full
    ctx = pool.context(page_tables, cached_lens, query_valid, append=True)
    net(ids, positions=pos, t=zeros, attn=ctx)            # attends to cache + new, stores new
    pool.free(pages)

Storage is flat token slots: slot = page * page_size + offset, tensors [n_layers, slots, Hkv, hd],
so a sequence's cache is wherever its page table points and freeing is returning page numbers.
Each forward, `attend` gathers the rows' cached slots into a dense [B, Hkv, S, hd] view (S = the
longest cache in the batch, or a fixed `window` >= it for static shapes) and runs SDPA with a
mask that hides the short rows' tails and the padding queries; on a GPU a paged-attention
kernel would read the pages in place instead.
The semantics are model/cache.py's KVCache (the reference): cached tokens and the valid new
tokens are all visible to every new query, and `append` stores the valid new tokens in order.
"""

from __future__ import annotations

import math

import torch

from kernels.attention import attention
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
                window: int | None = None) -> PagedAttention:
        return PagedAttention(self, page_tables, cached_lens, query_valid, append, window)


class PagedAttention:
    """AttentionContext over the pool for one batched forward.

    page_tables[b]: the pages of row b (enough for its cache plus what `append` stores);
    cached_lens[b]: tokens already cached; query_valid: bool [B, Lq], False for padding;
    window: keys read per row (>= the longest cache; None = exactly that), the tail masked, so
    the shapes stay static across steps for CUDA graphs (engine/cuda_graphs.py).
    Index tensors are built once here and reused by every layer."""

    def __init__(self, pool: PagedKVPool, page_tables: list[list[int]], cached_lens: list[int],
                 query_valid: torch.Tensor, append: bool, window: int | None = None):
        self.pool, self.append = pool, append
        # what pool.context() was given: a tensor-parallel follower rebuilds the same context
        # over its own pool from these (engine/tensor_parallel.py)
        self.args = dict(page_tables=page_tables, cached_lens=cached_lens,
                         query_valid=query_valid, append=append, window=window)
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
        self.S, self.B = S, B
        cached = j[None, :] < lens[:, None]  # [B, S]
        self.key_valid = torch.cat([cached, query_valid], dim=1)  # [B, S + Lq]
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
        B, K = self.key_valid.shape
        return self.key_valid[:, None, None, :].expand(B, 1, K - self.S, K)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H, Lq, hd]; k, v: [B, Hkv, Lq, hd] of the new tokens (rotary applied)."""
        pool, B, S = self.pool, self.B, self.S
        Hkv, hd = k.shape[1], k.shape[3]
        k_cached = pool.k[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
        v_cached = pool.v[layer].index_select(0, self.read_slots).view(B, S, Hkv, hd)
        k_all = torch.cat([k_cached.transpose(1, 2).to(k.dtype), k], dim=2)  # [B, Hkv, S+Lq, hd]
        v_all = torch.cat([v_cached.transpose(1, 2).to(v.dtype), v], dim=2)
        out = attention(q, k_all, v_all, self.mask)
        if self.append:
            new_k = k.transpose(1, 2)[self.write_rows, self.write_cols]  # [n_valid, Hkv, hd]
            new_v = v.transpose(1, 2)[self.write_rows, self.write_cols]
            pool.k[layer].index_copy_(0, self.write_slots, new_k.to(pool.k.dtype))
            pool.v[layer].index_copy_(0, self.write_slots, new_v.to(pool.v.dtype))
        return out
