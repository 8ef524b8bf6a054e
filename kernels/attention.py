"""Attention: the one place that decides how softmax(q k^T) v is computed.

    out = attention(q, k, v, mask)   # q: [B, H, Lq, hd], k/v: [B, Hkv, Lk, hd] (GQA: H % Hkv == 0)
                                     # mask: bool [B or 1, 1, Lq, Lk], True = may attend; None = full

Paths: PyTorch SDPA (default, any device); flash-attn when installed on CUDA and no mask is
needed (the non-causal case the samplers hit most). Block-causal training passes a dense mask
to SDPA, which is exact and fast enough at the sequence lengths tiny-coder trains on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # flash-attn is the optional `gpu` extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = None


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
    if (mask is None and flash_attn_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):
        # flash-attn wants [B, L, H, hd] and handles GQA natively.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              causal=False)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
