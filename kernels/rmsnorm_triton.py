"""RMSNorm fused with adaLN modulation, in Triton: one read of x, one write of y.

    y = rms_norm(x, weight, eps, shift=None, scale=None)
    # x: [..., L, d]; weight: [d] or None; shift/scale broadcast to x, typically [B, L or 1, d]
    # y = x / rms(x) * weight * (1 + scale) + shift, statistics in float32 (as the reference)

One program per row of d. The modulation tensors are read through their strides after
broadcasting to x's shape viewed as [B, L, d], so a per-sequence [B, 1, d] modulation costs no
copy (stride 0 along L). The unfused version reads and writes [B, L, d] three or four times
(normalise, weight, scale, shift); this reads x once and the modulations once per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, y_ptr, w_ptr, shift_ptr, scale_ptr,
    L, d, eps,
    sx_b, sx_l, sy_b, sy_l,
    ssh_b, ssh_l, ssc_b, ssc_l,
    HAS_W: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    li = r % L
    cols = tl.arange(0, BLOCK_D)
    valid = cols < d
    x = tl.load(x_ptr + b * sx_b + li * sx_l + cols, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + b * ssc_b + li * ssc_l + cols, mask=valid, other=0.0)
        y = y * (1.0 + sc.to(tl.float32))
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + b * ssh_b + li * ssh_l + cols, mask=valid, other=0.0)
        y = y + sh.to(tl.float32)
    tl.store(y_ptr + b * sy_b + li * sy_l + cols, y.to(y_ptr.dtype.element_ty), mask=valid)


def _as_bld(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast t to `shape` and view it as [B, L, d]; a copy only for odd layouts."""
    t = t.expand(shape)
    if len(shape) == 3:
        return t
    L, d = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    try:
        return t.view(-1, L, d)
    except RuntimeError:  # broadcast along a leading dim that cannot be merged: materialise
        return t.reshape(-1, L, d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             shift: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    shape = x.shape
    d = shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    x3 = _as_bld(x, shape)  # [B, L, d]
    B, L, _ = x3.shape
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    y3 = y.view(B, L, d)
    if x3.numel() == 0:
        return y
    sh3 = _as_bld(shift, shape) if shift is not None else None
    sc3 = _as_bld(scale, shape) if scale is not None else None
    for t in (sh3, sc3):
        if t is not None and t.stride(-1) not in (0, 1):
            raise ValueError("shift/scale must be contiguous along the feature dim")
    if (sh3 is not None and sh3.stride(-1) == 0) or (sc3 is not None and sc3.stride(-1) == 0):
        sh3 = sh3.contiguous() if sh3 is not None else None  # scalar-per-row modulation: rare
        sc3 = sc3.contiguous() if sc3 is not None else None
    dummy = x3
    _rmsnorm_kernel[(B * L,)](
        x3, y3, weight if weight is not None else dummy,
        sh3 if sh3 is not None else dummy, sc3 if sc3 is not None else dummy,
        L, d, float(eps),
        x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
        sh3.stride(0) if sh3 is not None else 0, sh3.stride(1) if sh3 is not None else 0,
        sc3.stride(0) if sc3 is not None else 0, sc3.stride(1) if sc3 is not None else 0,
        HAS_W=weight is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=4 if d <= 2048 else 8,
    )
    return y
