"""One switch for every fused op: Triton kernels or their torch references.

`DLLM_KERNELS=triton|torch` overrides; the default is Triton on CUDA tensors and torch elsewhere
(Triton runs on the CPU only under TRITON_INTERPRET=1, which is for tests, not speed).
"""

from __future__ import annotations

import os

import torch


def kernel_mode() -> str:
    mode = os.environ.get("DLLM_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"DLLM_KERNELS must be triton, torch or auto, got {mode!r}")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return x.is_cuda
