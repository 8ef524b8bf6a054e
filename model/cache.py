"""A contiguous KV cache of clean tokens (prompt, finished blocks) for B sequences.

    cache = KVCache(cfg, batch=B, max_len=S, device=dev, dtype=dtype)
    net(prompt_ids, positions=pos, t=zeros, attn=cache.context(append=True))   # prefill
    net(block_ids, positions=pos, t=frac, attn=cache.context())                 # denoise: read only
    net(block_ids, positions=pos, t=zeros, attn=cache.context(append=True))     # commit the block

For block-causal models this is exact: a finished block is re-encoded once as clean tokens (t=0),
which is precisely what later blocks attended to in training. Sequences may have different
cached lengths; the cache masks each row's unused tail. The engine keeps a paged pool of its own;
this one is the reference the paged pool is tested against.

Full-attention models (LLaDA, Dream) use it for Fast-dLLM's approximate prefix / dual cache
(model/sampling.py, `full_cache`):

    net(ids, t=t, attn=cache.refresh(), logits_slice=...)      # full forward; stores every K/V
    net(q_ids, positions=pos, t=t, attn=cache.context(hide=(start, end)))   # read only

`refresh()` attends exactly as a plain DenseAttention() forward (the same kernel call, so its
logits are bit-identical to the uncached ones) and overwrites slots 0.. with the K/V of every
token; `hide` takes per-row slot ranges [start, end) out of what the queries see (the stale
copies of the tokens the call recomputes).
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
                commit_len: int = 0,
                hide: tuple[torch.Tensor, torch.Tensor] | None = None) -> _CacheContext:
        """query_valid: bool [B, Lq], False for padding in this call (neither attended nor stored).

        commit_len > 0 fuses a cache write into a denoising step: the call's first commit_len
        tokens are a just-finished block (t=0) that is stored and attends only to the cache and
        itself, and the rest (the next block) attends to everything. One forward instead of two:
        with block length 1 this is what makes the autoregressive baseline one pass per token.

        hide: (start [B], end [B]) long: cached slots start[b] <= j < end[b] of row b are not
        attended (read-only calls: the dual cache's stale block)."""
        if hide is not None and (append or commit_len):
            raise ValueError("hide is for read-only calls")
        return _CacheContext(self, append, query_valid, commit_len, hide)

    def refresh(self) -> _RefreshContext:
        """A full forward over every row's whole sequence (no padding) that attends exactly as
        DenseAttention() and stores the K/V of every token at slots 0 .. Lq-1 (lengths = Lq)."""
        return _RefreshContext(self)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0


class _RefreshContext:
    def __init__(self, cache: KVCache):
        self.cache = cache

    def attend(self, layer, q, k, v):
        c = self.cache
        Lq = k.shape[2]
        if Lq > c.max_len:
            raise RuntimeError(f"KV cache overflow: {c.max_len} slots")
        out = attention(q, k, v, None)  # what DenseAttention() runs: bit-identical logits
        c.k[layer, :, :, :Lq] = k.to(c.k.dtype)
        c.v[layer, :, :, :Lq] = v.to(c.v.dtype)
        if layer == c.n_layers - 1:
            c.lengths.fill_(Lq)
            c.max_used = max(c.max_used, Lq)
        return out


class _CacheContext:
    def __init__(self, cache: KVCache, append: bool, query_valid: torch.Tensor | None,
                 commit_len: int = 0, hide: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cache, self.append, self.query_valid = cache, append, query_valid
        self.commit_len, self.hide = commit_len, hide

    def attend(self, layer, q, k, v):
        c = self.cache
        B, _, Lq, _ = q.shape
        S = c.max_used
        dev = q.device
        j = torch.arange(S, device=dev)[None, :]
        cached = j < c.lengths[:, None]  # [B, S]
        if self.hide is not None:
            start, end = self.hide
            cached = cached & ~((j >= start[:, None]) & (j < end[:, None]))
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
