"""Rotary position embedding (NeoX / Llama "rotate_half" layout) applied to q and k.

    cos, sin = rotary_cos_sin(positions, head_dim, theta)   # positions: [B, L] -> [B, 1, L, hd]
    q, k = apply_rotary(q, k, cos, sin)                     # q: [B, H, L, hd], k: [B, Hkv, L, hd]
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qf, kf, cf, sf = q.float(), k.float(), cos.float(), sin.float()
    q_out = qf * cf + _rotate_half(qf) * sf
    k_out = kf * cf + _rotate_half(kf) * sf
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from kernels import rotary_triton

        return rotary_triton.apply_rotary(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)
