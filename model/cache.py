"""A contiguous KV cache of clean tokens (prompt, finished blocks) for B sequences.

    cache = KVCache(cfg, batch=B, max_len=S, device=dev, dtype=dtype)
    net(prompt_ids, positions=pos, t=zeros, attn=cache.context(append=True))   # prefill
    net(block_ids, positions=pos, t=frac, attn=cache.context())                 # denoise: read only
    net(block_ids, positions=pos, t=zeros, attn=cache.context(append=True))     # commit the block

For block-causal models this is exact: a finished block is re-encoded once as clean tokens (t=0),
which is precisely what later blocks attended to in training. Sequences may have different
cached lengths; the cache masks each row's unused tail. The engine keeps a paged pool of its own;
this one is the reference the paged pool is tested against.
"""

from __future__ import annotations

import torch

from kernels.attention import attention
from model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layers, self.max_len = cfg.n_layers, max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_used = 0  # host-side bound on lengths, so reads need no device sync

    def context(self, append: bool = False, query_valid: torch.Tensor | None = None,
                commit_len: int = 0) -> _CacheContext:
        """query_valid: bool [B, Lq], False for padding in this call (neither attended nor stored).

        commit_len > 0 fuses a cache write into a denoising step: the call's first commit_len
        tokens are a just-finished block (t=0) that is stored and attends only to the cache and
        itself, and the rest (the next block) attends to everything. One forward instead of two:
        with block length 1 this is what makes the autoregressive baseline one pass per token."""
        return _CacheContext(self, append, query_valid, commit_len)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0


class _CacheContext:
    def __init__(self, cache: KVCache, append: bool, query_valid: torch.Tensor | None,
                 commit_len: int = 0):
        self.cache, self.append, self.query_valid = cache, append, query_valid
        self.commit_len = commit_len

    def attend(self, layer, q, k, v):
        c = self.cache
        B, _, Lq, _ = q.shape
        S = c.max_used
        dev = q.device
        cached = torch.arange(S, device=dev)[None, :] < c.lengths[:, None]  # [B, S]
        new = self.query_valid if self.query_valid is not None else \
            torch.ones(B, Lq, dtype=torch.bool, device=dev)
        mask = torch.cat([cached, new], dim=1)[:, None, None, :].expand(B, 1, Lq, S + Lq)
        n = self.commit_len
        if n:
            # rows of the finished block must not see the next block's (noisy) tokens
            blocked = torch.zeros(Lq, S + Lq, dtype=torch.bool, device=dev)
            blocked[:n, S + n:] = True
            mask = mask & ~blocked
        k_all = torch.cat([c.k[layer, :, :, :S].to(k.dtype), k], dim=2)
        v_all = torch.cat([c.v[layer, :, :, :S].to(v.dtype), v], dim=2)
        out = attention(q, k_all, v_all, mask)
        if self.append:
            self._store(layer, k, v, new)
        elif n:
            stored = new.clone()
            stored[:, n:] = False
            self._store(layer, k, v, stored)
        return out

    def _store(self, layer, k, v, new):
        c = self.cache
        B, _, Lq, _ = k.shape
        # Valid new tokens of row b go to slots lengths[b] .. lengths[b] + n_b - 1, in order.
        slot = c.lengths[:, None] + new.long().cumsum(1) - 1  # [B, Lq]
        if int(slot.max()) >= c.max_len:
            raise RuntimeError(f"KV cache overflow: {c.max_len} slots")
        rows, cols = new.nonzero(as_tuple=True)
        c.k[layer].transpose(1, 2)[rows, slot[rows, cols]] = k.transpose(1, 2)[rows, cols].to(c.k.dtype)
        c.v[layer].transpose(1, 2)[rows, slot[rows, cols]] = v.transpose(1, 2)[rows, cols].to(c.v.dtype)
        if layer == c.n_layers - 1:
            c.lengths += new.sum(1)
            c.max_used = max(c.max_used, int(c.lengths.max()))
