"""Rotary embedding of q and k in one Triton launch (NeoX / Llama rotate_half layout).

    q_out, k_out = apply_rotary(q, k, cos, sin)
    # q: [B, H, L, hd], k: [B, Hkv, L, hd] (any strides, e.g. the transposed views the attention
    # module makes); cos, sin: [B or 1, 1, L, hd] as kernels.rotary.rotary_cos_sin returns

    out[..., :h] = x1 * cos[:h] - x2 * sin[:h];  out[h:rd] = x2 * cos[h:] + x1 * sin[h:]
    (rd = cos.shape[-1] <= hd, h = rd / 2, x1 = x[..., :h], x2 = x[..., h:rd]), in float32,
    stored in q's / k's dtype; partial rotary (rd < hd) copies dims [rd, hd) through in the
    same program.

Grid: one program per (b, l) position and group of heads; the first programs of the second
axis take q's heads, the rest k's, so q and k share a launch and the cos/sin row is read once per
program instead of once per head. The torch reference launches about eight kernels per tensor
(casts, two chunks, a cat, two products, a sum, a cast back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(in_ptr, out_ptr, b, li, h0, n_heads, c1, c2, s1, s2,
            si_b, si_h, si_l, so_b, so_h, so_l, half, rest,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    heads = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    valid = (heads[:, None] < n_heads) & (cols[None, :] < half)
    src = in_ptr + b * si_b + li * si_l + heads[:, None].to(tl.int64) * si_h + cols[None, :]
    x1 = tl.load(src, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + half, mask=valid, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    dst = out_ptr + b * so_b + li * so_l + heads[:, None].to(tl.int64) * so_h + cols[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, o1.to(ty), mask=valid)
    tl.store(dst + half, o2.to(ty), mask=valid)
    if BLOCK_REST > 0:  # partial rotary: dims [2 * half, hd) pass through unchanged
        rcols = tl.arange(0, BLOCK_REST)
        rvalid = (heads[:, None] < n_heads) & (rcols[None, :] < rest)
        rsrc = in_ptr + b * si_b + li * si_l + heads[:, None].to(tl.int64) * si_h \
            + 2 * half + rcols[None, :]
        rdst = out_ptr + b * so_b + li * so_l + heads[:, None].to(tl.int64) * so_h \
            + 2 * half + rcols[None, :]
        tl.store(rdst, tl.load(rsrc, mask=rvalid, other=0.0), mask=rvalid)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    L, H, Hkv, half, rest,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
    sqo_b, sqo_h, sqo_l, sko_b, sko_h, sko_l,
    sc_b, sc_l, ss_b, ss_l,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = pos // L
    li = pos % L
    cols = tl.arange(0, BLOCK_HALF)
    cm = cols < half
    cbase = cos_ptr + b * sc_b + li * sc_l
    sbase = sin_ptr + b * ss_b + li * ss_l
    c1 = tl.load(cbase + cols, mask=cm, other=0.0).to(tl.float32)
    c2 = tl.load(cbase + half + cols, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.load(sbase + cols, mask=cm, other=0.0).to(tl.float32)
    s2 = tl.load(sbase + half + cols, mask=cm, other=0.0).to(tl.float32)
    n_q_groups = tl.cdiv(H, BLOCK_H)
    if g < n_q_groups:
        _rotate(q_ptr, qo_ptr, b, li, g * BLOCK_H, H, c1, c2, s1, s2,
                sq_b, sq_h, sq_l, sqo_b, sqo_h, sqo_l, half, rest, BLOCK_H, BLOCK_HALF,
                BLOCK_REST)
    else:
        _rotate(k_ptr, ko_ptr, b, li, (g - n_q_groups) * BLOCK_H, Hkv, c1, c2, s1, s2,
                sk_b, sk_h, sk_l, sko_b, sko_h, sko_l, half, rest, BLOCK_H, BLOCK_HALF,
                BLOCK_REST)


def _bcast_bl(t: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, int, int]:
    """cos/sin [B or 1, 1, L, hd] -> (tensor with unit last stride, stride_b, stride_l)."""
    t = t.expand(B, 1, L, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, L, hd = q.shape
    Hkv = k.shape[1]
    rd = cos.shape[-1]  # rotary dims: hd, or fewer for partial rotary
    if rd % 2 or rd > hd:
        raise ValueError(f"rotary needs an even rotary dim <= head_dim, got {rd} of {hd}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    # empty_like keeps q's strides (e.g. the [B, L, H, hd] memory of a transposed projection)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return q_out, k_out
    cos, sc_b, sc_l = _bcast_bl(cos, B, L)
    sin, ss_b, ss_l = _bcast_bl(sin, B, L)
    half, rest = rd // 2, hd - rd
    BLOCK_H = min(triton.next_power_of_2(max(H, Hkv)), 16)
    grid = (B * L, triton.cdiv(H, BLOCK_H) + triton.cdiv(Hkv, BLOCK_H))
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin,
        L, H, Hkv, half, rest,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        sc_b, sc_l, ss_b, ss_l,
        BLOCK_H=BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=4,
    )
    return q_out, k_out
