"""Gathered low-rank matmuls: every row of a batch through its own LoRA adapter, in one call.

    y = lora_delta(x, a, b, slots)          # x: [B, L, K]; a: [S, R, K]; b: [S, N, R]; slots: [B]
    out = add_lora(out, x, a, b, slots)     # out + lora_delta(...), in place on the fast path
    y = gathered_linear(x, w, slots)        # x @ w[slots[b]].T per row: a full-rank per-row weight

Row b uses adapter slot `slots[b]` (-1: no adapter, a zero delta): delta[b] = x[b] @ A_s.T @ B_s.T
with A_s = a[s] [R, K] and B_s = b[s] [N, R] (the PEFT orientation; the LoRA scale is folded into
b when an adapter is loaded). Adapters of lower rank than R are zero-padded, which adds nothing.
This is Punica's BGMV/SGMV idea (one launch for a batch of many adapters, instead of one pass per
adapter): the torch reference below gathers each row's A and B and runs two bmm's; the Triton
kernels (kernels/lora_triton.py) read each row's A/B tiles through the slot index without
gathering copies, shrink (x -> [B, L, R] in float32) then expand (added into `out`).

The reference is the definition and the only differentiable path (model/train_lora.py trains
through it); the dispatch picks Triton on CUDA when no gradient is wanted.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         slots: torch.Tensor) -> torch.Tensor:
    """x: [B, L, K]; a: [S, R, K]; b: [S, N, R]; slots: [B] long (-1 = none) -> [B, L, N]."""
    s = slots.clamp(min=0)
    h = torch.bmm(x, a[s].transpose(1, 2).to(x.dtype))  # [B, L, R]
    y = torch.bmm(h, b[s].transpose(1, 2).to(x.dtype))  # [B, L, N]
    return y * (slots >= 0).to(y.dtype)[:, None, None]


def gathered_linear_reference(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: [B, L, K]; w: [S, N, K]; slots: [B] -> x[b] @ w[slots[b]].T [B, L, N] (rows with slot
    -1 get zeros)."""
    s = slots.clamp(min=0)
    y = torch.bmm(x, w[s].transpose(1, 2).to(x.dtype))
    return y * (slots >= 0).to(y.dtype)[:, None, None]


def _fast(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return use_triton(x) and not (torch.is_grad_enabled()
                                  and any(t.requires_grad for t in (x, *tensors)))


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    if _fast(x, a, b):
        from kernels import lora_triton  # lazily: triton is optional on CPU

        out = torch.zeros(*x.shape[:-1], b.shape[1], dtype=x.dtype, device=x.device)
        return lora_triton.add_lora(out, x, a, b, slots)
    return lora_delta_reference(x, a, b, slots)


def add_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
    """out [B, L, N] + lora_delta(x, a, b, slots); the Triton path adds in place."""
    if _fast(x, a, b) and not (torch.is_grad_enabled() and out.requires_grad):
        from kernels import lora_triton

        return lora_triton.add_lora(out, x, a, b, slots)
    return out + lora_delta_reference(x, a, b, slots)


def gathered_linear(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    if _fast(x, w):
        from kernels import lora_triton

        return lora_triton.gathered_linear(x, w, slots)
    return gathered_linear_reference(x, w, slots)
