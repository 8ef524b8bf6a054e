"""Rotary position embedding (NeoX / Llama "rotate_half" layout) applied to q and k.

    cos, sin = rotary_cos_sin(positions, head_dim, theta)   # positions: [B, L] -> [B, 1, L, hd]
    q, k = apply_rotary(q, k, cos, sin)                     # q: [B, H, L, hd], k: [B, Hkv, L, hd]

    # context extension and partial rotary (model/rope.py computes inv_freq per scaling type)
    cos, sin = rotary_cos_sin(positions, head_dim, theta, inv_freq=inv_freq,
                              attention_scaling=mscale)      # -> [B, 1, L, rd], rd = 2 * len(inv_freq)
    q, k = apply_rotary(q, k, cos, sin)    # rotates dims [0, rd) of each head, passes [rd, hd)

The attention scaling (YaRN's mscale) multiplies cos and sin, so it scales the rotated dims of q
and of k, as transformers applies it. Both paths (the torch reference here and the Triton kernel
in rotary_triton.py) take cos/sin narrower than the head as partial rotary.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype = torch.float32, *, inv_freq: torch.Tensor | None = None,
                   attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> cos, sin [B, 1, L, rd] (rd = head_dim, or 2 * len(inv_freq))."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                                 dtype=torch.float32) / head_dim))
    else:
        inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    freqs = positions.float()[..., None] * inv_freq  # [B, L, rd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, rd]
    cos, sin = emb.cos(), emb.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rd = cos.shape[-1]
    cf, sf = cos.float(), sin.float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rot, rest = xf[..., :rd], xf[..., rd:]
        out = rot * cf + _rotate_half(rot) * sf
        return (torch.cat([out, rest], dim=-1) if rest.shape[-1] else out).to(x.dtype)

    return rotate(q), rotate(k)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from kernels import rotary_triton

        return rotary_triton.apply_rotary(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)
