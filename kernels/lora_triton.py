"""Gathered matmuls in Triton: each batch row multiplies by the weight of its own adapter slot.

    out = add_lora(out, x, a, b, slots)   # out[b] += (x[b] @ a[s].T) @ b[s].T, s = slots[b] >= 0
    y = gathered_linear(x, w, slots)      # y[b] = x[b] @ w[s].T (zeros where s = -1)
    # x: [B, L, K]; a: [S, R, K]; b: [S, N, R]; w: [S, N, K]; slots: [B] int64

One kernel, `_gathered_mm`, computes out[b, m-tile, n-tile] (+)= x[b, m-tile, :] @ w[s_b, n-tile,
:].T with the slot read once per program: a grid of (rows, L tiles, N tiles), float32
accumulation, the weight tile addressed through the slot's stride, so no per-row copy of any
adapter is made (the reference in kernels/lora.py gathers [B, R, K] and [B, N, R] copies first).
add_lora is two launches: shrink (x -> h [B, L, R] float32, N = R) then expand (h -> out,
accumulated in place, K = R). A row without an adapter (slot -1) loops over no K at all and, when
accumulating, stores nothing. The torch reference is kernels/lora.py's; tests run both under
TRITON_INTERPRET=1 on awkward shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gathered_mm(
    x_ptr, w_ptr, slot_ptr, out_ptr,
    L, N, K,
    sx_b, sx_l, sx_k, sw_s, sw_n, sw_k, so_b, so_l, so_n,
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    s = tl.load(slot_ptr + b)
    live = s >= 0
    s = tl.maximum(s, 0).to(tl.int64)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < L
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(live, K, 0)  # a row without adapter reads nothing
    for k0 in range(0, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_ptr + b * sx_b + rm[:, None] * sx_l + rk[None, :] * sx_k,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        wt = tl.load(w_ptr + s * sw_s + rn[None, :] * sw_n + rk[:, None] * sw_k,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:  # bf16/fp16 tensor-core dot, fp32 accumulation
            acc += tl.dot(xt.to(wt.dtype), wt)
    o_ptrs = out_ptr + b * so_b + rm[:, None] * so_l + rn[None, :] * so_n
    o_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        # rows without an adapter store nothing: their L is taken as 0
        w_mask = (rm < tl.where(live, L, 0))[:, None] & n_ok[None, :]
        prev = tl.load(o_ptrs, mask=w_mask, other=0.0)
        tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=w_mask)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# The interpreter's bf16/fp16 tl.dot returns garbage (numpy has no bf16: measured errors of 1e10
# on unit inputs), so under TRITON_INTERPRET the tiles are upcast first; the rounding of the
# inputs to the dtype happened at the load either way.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    # tl.dot needs every tile dimension >= 16; 64 keeps a tile in registers at fp32
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _launch(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, out: torch.Tensor,
            accumulate: bool) -> None:
    B, L, K = x.shape
    _, N, K2 = w.shape
    if K2 != K or out.shape != (B, L, N) or slots.shape != (B,):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"out {tuple(out.shape)}, slots {tuple(slots.shape)}")
    if B == 0 or L == 0 or N == 0:
        return
    BM, BN, BK = _block(L), _block(N), _block(K)
    grid = (B, triton.cdiv(L, BM), triton.cdiv(N, BN))
    _gathered_mm[grid](
        x, w, slots.to(torch.int64).contiguous(), out, L, N, K,
        x.stride(0), x.stride(1), x.stride(2), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ACCUMULATE=accumulate, DOT_FP32=_INTERPRET or w.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)


def add_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
    """out [B, L, N] += per-row (x @ A.T) @ B.T, in place; returns out."""
    B, L, _ = x.shape
    h = torch.empty(B, L, a.shape[1], dtype=torch.float32, device=x.device)  # [B, L, R]
    _launch(x, a, slots, h, accumulate=False)  # shrink
    _launch(h, b, slots, out, accumulate=True)  # expand, into out
    return out


def gathered_linear(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [B, L, K] @ w[slots[b]].T -> [B, L, N] (zeros for slot -1)."""
    out = torch.empty(*x.shape[:-1], w.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, w, slots, out, accumulate=False)
    return out
