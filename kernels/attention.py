"""Attention: the one place that decides how softmax(q k^T / sqrt(hd)) v is computed.

Callers describe what a query may see in one of three ways; this module picks the path.

    out = attention(q, k, v, mask)           # a dense mask; q: [B, H, Lq, hd], k/v: [B, Hkv, Lk, hd]
                                             # mask: bool [B or 1, 1, Lq, Lk], True = may attend
    rows = Ragged.prefix(lens, L, device)    # per-row lengths: row b's first lens[b] tokens
    out = ragged_attention(q, k, v, rows)    # every query of row b sees the keys rows.key_valid[b]
    out = varlen_attention(q, k_packed, v_packed, cu_keys, max_keys, query_valid)  # keys packed
    ctx = BlockDiffusionAttention(seg)       # BD3-LM training over [noisy ; clean] (an attn context)

Paths (GQA everywhere: H % Hkv == 0):
- attention: PyTorch SDPA; flash_attn_func when flash-attn is installed, q is CUDA fp16/bf16 and
  there is no mask.
- ragged_attention / varlen_attention, the engine's (engine/kv_pool.PagedAttention, the
  full-attention DenseAttention of engine/batch.py): flash-attn's `flash_attn_varlen_func`
  (non-causal, GQA native) when `use_varlen(q)`: flash-attn importable, q on CUDA in fp16/bf16,
  head_dim <= 256. The valid queries and keys of every row are packed back to back (cu_seqlens
  in int32, max_seqlen as host ints: upper bounds the caller knows without a device sync), the
  packed output is scattered back to [B, H, Lq, hd]; padding query rows come back as zeros.
  Otherwise SDPA with the equivalent dense mask (`Ragged.mask`, or the caller's mask): the
  results of the masked path the engine always used, padding query rows then attend to their
  row's keys (finite, read by nobody). A row with no visible key is unspecified (NaN in SDPA).
- BlockDiffusionAttention: FlexAttention (torch.compile'd flex_attention with a BlockMask from
  create_block_mask, the block-diffusion rule as mask_mod) on CUDA: it skips the fully masked
  128 x 128 tiles (60% of them at 2 x 1024 tokens, 68% at 2 x 2048, 32-token blocks; a query
  sees ~25% of the keys). A new batch's mask_mod closure does not recompile (one graph for
  three batches, checked compiled on the CPU). Elsewhere SDPA with the dense [2L, 2L] mask:
  eager flex_attention on the CPU materialises the scores and has no backward in torch 2.13,
  so only tests use it there. A failed flex call logs once and falls back to SDPA for the
  process.

`DLLM_ATTENTION=sdpa` forces the SDPA paths everywhere (VARLEN_PATH / TRAINING_PATH, which tests
and benchmarks set to "flash"/"flex"/"sdpa" to force a path; "auto" decides as above).

CUDA graphs (engine/cuda_graphs.py) keep the masked SDPA form: a graph binds the context's
key_valid / mask buffers only, and the varlen path's packed sizes and max_seqlen ints change
with every step's lengths; engine contexts built with a cache window (the static shapes) never
take the varlen path. flash-attn is not on any machine this project tests on: the varlen
packing runs on the CPU against `flash_attn_varlen_reference`, a float32 loop over sequences
with flash_attn_varlen_func's contract, monkeypatched in (tests/kernels/test_attention.py).
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import cached_property

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # flash-attn is the optional `gpu` extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = flash_attn_varlen_func = None

# "auto" | "flash" | "sdpa" and "auto" | "flex" | "sdpa": read at every call, so a test or a
# benchmark can force a path by setting the attribute.
_FORCED = os.environ.get("DLLM_ATTENTION", "auto").lower()
if _FORCED not in ("auto", "sdpa"):
    raise ValueError(f"DLLM_ATTENTION must be auto or sdpa, got {_FORCED!r}")
VARLEN_PATH = _FORCED
TRAINING_PATH = _FORCED

HALF = (torch.float16, torch.bfloat16)


# --- dense mask -------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax attention in float32, for tests."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    if (mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in HALF
            and VARLEN_PATH != "sdpa"):
        # flash-attn wants [B, L, H, hd] and handles GQA natively.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              causal=False)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# --- per-row lengths (the engine) -------------------------------------------------------------
def use_varlen(q: torch.Tensor) -> bool:
    """Whether ragged/varlen attention on these queries runs flash_attn_varlen_func."""
    if VARLEN_PATH == "sdpa":
        return False
    if VARLEN_PATH == "flash":
        if flash_attn_varlen_func is None:
            raise RuntimeError("VARLEN_PATH = 'flash' but flash-attn is not installed")
        return True
    return (flash_attn_varlen_func is not None and q.is_cuda and q.dtype in HALF
            and q.shape[-1] <= 256)


def pack_rows(valid: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the valid entries of each row back to back, rows in order, without a host sync.

    valid: bool [B, L]; total >= valid.sum() (a host-side bound: the packed buffer's rows).
    -> cu: int32 [B + 1] (row b is packed at cu[b] .. cu[b+1]-1),
       gather: long [total], the flat index b * L + j of each packed row (rows past cu[-1]: 0),
       dest: long [B, L], the packed row of each entry (invalid ones: `total`, a dump row)."""
    B, L = valid.shape
    dev = valid.device
    cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu[1:] = valid.sum(1).cumsum(0)
    rank = valid.long().cumsum(1) - 1  # [B, L]: index among the row's valid entries
    dest = torch.where(valid, cu[:-1, None].long() + rank, total)
    # duplicate writes only land on the dump row `total`, which is cut off
    gather = torch.zeros(total + 1, dtype=torch.long, device=dev)
    gather.scatter_(0, dest.reshape(-1), torch.arange(B * L, device=dev))
    return cu, gather[:total], dest


class Ragged:
    """What the queries of each row may see, when all of a row's queries see the same keys.

    key_valid: bool [B, Lk], the keys row b sees (any pattern; the engine's are per-row
    lengths: a prefix, or the paged pool's cached prefix + valid new tokens);
    max_keys >= key_valid.sum(1).max() and total_keys >= key_valid.sum(): host-side bounds
    (flash-attn's max_seqlen_k and the packed buffer size) the caller knows without a sync;
    query_valid: bool [B, Lq] or None (every query real): padding queries are not computed on
    the varlen path (zeros), bounds Lq and B * Lq."""

    def __init__(self, key_valid: torch.Tensor, max_keys: int, total_keys: int,
                 query_valid: torch.Tensor | None = None):
        self.key_valid, self.max_keys, self.total_keys = key_valid, max_keys, total_keys
        self.query_valid = query_valid

    @classmethod
    def prefix(cls, lens: list[int], L: int, device=None) -> Ragged:
        """Row b's first lens[b] of L tokens are real, as queries and as keys (right padding)."""
        valid = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        return cls(valid, max(lens), sum(lens), query_valid=valid)

    def mask(self, Lq: int) -> torch.Tensor:
        """The dense equivalent, bool [B, 1, Lq, Lk] (a view of key_valid)."""
        B, Lk = self.key_valid.shape
        return self.key_valid[:, None, None, :].expand(B, 1, Lq, Lk)

    @cached_property
    def packed_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pack_rows(key_valid): computed once, reused by every layer of the forward."""
        return pack_rows(self.key_valid, self.total_keys)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Ragged,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, Lq, hd]; k, v: [B, Hkv, Lk, hd] padded -> [B, H, Lq, hd].
    mask: the dense form the SDPA path uses (default rows.mask(Lq)); pass the caller's own to
    keep its exact results there."""
    if not use_varlen(q):
        return attention(q, k, v, rows.mask(q.shape[2]) if mask is None else mask)
    B, Hkv, Lk, hd = k.shape
    cu_k, gather, _ = rows.packed_keys
    # [B, Lk, Hkv, hd] rows: free when k is a transposed view of that layout (the model's)
    k_packed = k.transpose(1, 2).reshape(B * Lk, Hkv, hd).index_select(0, gather)
    v_packed = v.transpose(1, 2).reshape(B * Lk, Hkv, hd).index_select(0, gather)
    return varlen_attention(q, k_packed, v_packed, cu_k, rows.max_keys, rows.query_valid)


def varlen_attention(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor,
                     cu_keys: torch.Tensor, max_keys: int,
                     query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """flash_attn_varlen_func on padded queries and packed keys -> [B, H, Lq, hd].

    q: [B, H, Lq, hd]; k_packed, v_packed: [>= cu_keys[-1], Hkv, hd], row b's keys at
    cu_keys[b] .. cu_keys[b+1]-1 (int32 [B + 1]); max_keys: host bound on a row's keys.
    query_valid: bool [B, Lq] (packed like the keys; padding rows come back zero) or None."""
    B, H, Lq, hd = q.shape
    dev = q.device
    q_rows = q.transpose(1, 2).reshape(B * Lq, H, hd)  # [B * Lq, H, hd]
    if query_valid is None:
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=dev)
        q_packed = q_rows
    else:
        cu_q, q_gather, q_dest = pack_rows(query_valid, B * Lq)
        q_packed = q_rows.index_select(0, q_gather)
    out = flash_attn_varlen_func(q_packed, k_packed.to(q.dtype), v_packed.to(q.dtype),
                                 cu_q, cu_keys, Lq, max_keys,
                                 dropout_p=0.0, softmax_scale=hd ** -0.5, causal=False)
    # out: [B * Lq, H, hd] packed; rows past cu_q[-1] are whatever flash-attn left there
    if query_valid is not None:
        out = out.index_select(0, q_dest.reshape(-1).clamp(max=B * Lq - 1))
        out = out.masked_fill(~query_valid.reshape(-1)[:, None, None], 0)
    return out.view(B, Lq, H, hd).transpose(1, 2)


def flash_attn_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash_attn_varlen_func's contract in plain torch, one sequence at a time, float32 (float64
    for float64 inputs), for tests: q [total_q, H, hd], k/v [total_k, Hkv, hd], cu_seqlens int32
    [B + 1], max_seqlen host ints >= every sequence's length. Output rows past cu_seqlens_q[-1]
    are NaN (flash-attn leaves them uninitialised), so a caller that reads them fails a test."""
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert not causal and dropout_p == 0.0 and not kwargs
    assert q.dtype == k.dtype == v.dtype and q.shape[1] % k.shape[1] == 0
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[-1] <= q.shape[0] and ck[-1] <= k.shape[0]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[1] // k.shape[1]
    out = torch.full(q.shape, float("nan"), dtype=acc, device=q.device)
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert 0 <= nq <= max_seqlen_q and 0 <= nk <= max_seqlen_k, (b, nq, nk)
        if nq == 0:
            continue
        if nk == 0:
            out[cq[b]:cq[b + 1]] = 0
            continue
        qs = q[cq[b]:cq[b + 1]].to(acc).transpose(0, 1)  # [H, nq, hd]
        ks = k[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(rep, 0)  # [H, nk, hd]
        vs = v[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(rep, 0)
        p = (qs @ ks.transpose(1, 2) * scale).softmax(-1)
        out[cq[b]:cq[b + 1]] = (p @ vs).transpose(0, 1)
    return out.to(q.dtype)


# --- block-diffusion training -----------------------------------------------------------------
def block_diffusion_allowed(q_seg, k_seg, q_noisy, k_noisy):
    """The BD3-LM rule on [noisy ; clean] copies, elementwise (a FlexAttention mask_mod body and
    the dense mask's): noisy block b sees noisy b and clean < b; clean b sees clean <= b."""
    return ((q_noisy & k_noisy & (k_seg == q_seg)) | (q_noisy & ~k_noisy & (k_seg < q_seg))
            | (~q_noisy & ~k_noisy & (k_seg <= q_seg)))


def block_diffusion_dense_mask(seg: torch.Tensor) -> torch.Tensor:
    """seg: [B, L] segment ids -> bool [B, 1, 2L, 2L] (model.diffusion.block_diffusion_mask)."""
    L = seg.shape[1]
    idx = torch.arange(2 * L, device=seg.device)
    s = torch.cat([seg, seg], dim=1)  # [B, 2L]
    noisy = idx < L
    return block_diffusion_allowed(s[:, :, None], s[:, None, :], noisy[:, None],
                                   noisy[None, :])[:, None]


_flex_compiled = None
_flex_broken = False


def _flex_fn(device: torch.device):
    """torch.compile'd flex_attention on CUDA (the fused kernel); eager elsewhere (tests)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled


def use_flex(device: torch.device) -> bool:
    if TRAINING_PATH == "sdpa" or _flex_broken:
        return False
    if TRAINING_PATH == "flex":
        return True
    return device.type == "cuda"


class BlockDiffusionAttention:
    """AttentionContext (model/transformer.py) of one BD3-LM training forward over [noisy ; clean]:

        net(torch.cat([xt, x0], 1), ..., attn=BlockDiffusionAttention(seg))   # seg: [B, L]

    The mask is built once, on the first layer, in the form the chosen path reads."""

    def __init__(self, seg: torch.Tensor):
        self.seg = seg  # [B, L] segment of each position (model.diffusion.segment_ids)
        self.flex = use_flex(seg.device)
        self._block_mask = None
        self._dense = None

    @property
    def dense_mask(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = block_diffusion_dense_mask(self.seg)  # [B, 1, 2L, 2L]
        return self._dense

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            seg = self.seg
            B, L = seg.shape

            def mask_mod(b, h, q_idx, kv_idx):
                return block_diffusion_allowed(seg[b, q_idx % L], seg[b, kv_idx % L],
                                               q_idx < L, kv_idx < L)

            self._block_mask = create_block_mask(mask_mod, B, None, 2 * L, 2 * L,
                                                 device=seg.device)
        return self._block_mask

    def attend(self, layer, q, k, v):
        """q: [B, H, 2L, hd]; k, v: [B, Hkv, 2L, hd] -> [B, H, 2L, hd]."""
        global _flex_broken
        if self.flex and not _flex_broken:
            try:
                with warnings.catch_warnings():  # eager flex (CPU tests) warns it is unfused
                    warnings.simplefilter("ignore", UserWarning)
                    return _flex_fn(q.device)(q, k, v, block_mask=self.block_mask(),
                                              enable_gqa=q.shape[1] != k.shape[1])
            except Exception:
                if TRAINING_PATH == "flex":
                    raise
                log.exception("flex_attention failed; block-diffusion training attention "
                              "falls back to SDPA with a dense mask")
                _flex_broken = True
        return attention(q, k, v, self.dense_mask)
