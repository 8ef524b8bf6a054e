"""RMSNorm, optionally fused with adaptive-LayerNorm modulation (shift, scale).

    y = rms_norm(x, weight, eps, shift=None, scale=None)   # x: [..., d]; shift/scale broadcast to x

The torch reference below is the definition; a Triton kernel may sit beside it and is chosen by
`kernels.dispatch.use_triton()`. Statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       shift: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if scale is not None:
        y = y * (1.0 + scale.float())
    if shift is not None:
        y = y + shift.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        from kernels import rmsnorm_triton  # imported lazily: triton is optional on CPU

        return rmsnorm_triton.rms_norm(x, weight, eps, shift, scale)
    return rms_norm_reference(x, weight, eps, shift, scale)
