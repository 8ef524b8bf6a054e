"""The Triton RMSNorm(+adaLN) and rotary kernels are pinned to their torch references.

Both compute in float32 and round once to the input dtype, as the references do, so the error is
the final rounding: 0 ulp in fp32 up to summation order, at most a couple of ulp in bf16/fp16
(the interpreter's bf16 cast truncates where CUDA rounds, hence 2 ulp).
"""

import pytest
import torch

from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rotary import apply_rotary, apply_rotary_reference, rotary_cos_sin

# rtol ~ 2 ulp of the dtype; atol for values near 0
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _check(name, got, want, report):
    rtol, atol = TOL[want.dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    report(name, got, want)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def _rmsnorm_triton(*args):
    from kernels import rmsnorm_triton

    return rmsnorm_triton.rms_norm(*args)


def _rotary_triton(*args):
    from kernels import rotary_triton

    return rotary_triton.apply_rotary(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modulation", ["none", "per_sequence", "per_token", "shift_only",
                                        "scale_only"])
def test_rmsnorm_adaln_matches_reference(dtype, modulation, device, report):
    B, L, d = 3, 37, 257  # odd everything
    x = _rand(B, L, d, dtype=dtype, device=device)
    w = _rand(d, dtype=dtype, device=device, seed=1)
    shift = scale = None
    if modulation in ("per_sequence", "shift_only"):
        shift = _rand(B, 1, d, dtype=dtype, device=device, seed=2)
    if modulation in ("per_sequence", "scale_only"):
        scale = _rand(B, 1, d, dtype=dtype, device=device, seed=3) * 0.1
    if modulation == "per_token":
        shift = _rand(B, L, d, dtype=dtype, device=device, seed=2)
        scale = _rand(B, L, d, dtype=dtype, device=device, seed=3) * 0.1
    for weight in (w, None):
        _check(f"rmsnorm {modulation} {dtype} w={weight is not None}",
               _rmsnorm_triton(x, weight, 1e-5, shift, scale),
               rms_norm_reference(x, weight, 1e-5, shift, scale), report)


@pytest.mark.parametrize("shape", [(5, 129), (2, 3, 4, 65), (1, 4096)])
def test_rmsnorm_other_ranks(shape, device, report):
    x = _rand(*shape, dtype=torch.float32, device=device)
    _check(f"rmsnorm {shape}", _rmsnorm_triton(x, None, 1e-6), rms_norm_reference(x, None, 1e-6),
           report)


def test_rmsnorm_dispatch(device, monkeypatch, report):
    x = _rand(2, 7, 64, dtype=torch.float32, device=device)
    w = _rand(64, dtype=torch.float32, device=device)
    monkeypatch.setenv("DLLM_KERNELS", "triton")
    _check("rmsnorm dispatch", rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), report)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Hkv,hd", [(2, 11, 6, 2, 34), (1, 5, 32, 32, 128),
                                           (3, 1, 4, 4, 18)])
def test_rotary_matches_reference(B, L, H, Hkv, hd, dtype, device, report):
    # q/k as the attention module makes them: [B, L, H, hd] memory seen as [B, H, L, hd]
    q = _rand(B, L, H, hd, dtype=dtype, device=device).transpose(1, 2)
    k = _rand(B, L, Hkv, hd, dtype=dtype, device=device, seed=1).transpose(1, 2)
    offsets = torch.arange(B, device=device)[:, None] * 7  # rows at different positions
    pos = torch.arange(L, device=device)[None] + offsets
    for cos, sin in (rotary_cos_sin(pos, hd, 10000.0, dtype=dtype),
                     rotary_cos_sin(pos[:1], hd, 500000.0)):  # [1, ...] broadcast, fp32 tables
        got_q, got_k = _rotary_triton(q, k, cos, sin)
        want_q, want_k = apply_rotary_reference(q, k, cos, sin)
        _check(f"rotary q {dtype} {tuple(q.shape)}", got_q, want_q, report)
        _check(f"rotary k {dtype} {tuple(k.shape)}", got_k, want_k, report)


def test_rotary_contiguous_inputs_and_dispatch(device, monkeypatch, report):
    q = _rand(2, 4, 9, 16, dtype=torch.float32, device=device)
    k = _rand(2, 2, 9, 16, dtype=torch.float32, device=device, seed=1)
    cos, sin = rotary_cos_sin(torch.arange(9, device=device)[None].expand(2, 9), 16, 10000.0)
    monkeypatch.setenv("DLLM_KERNELS", "triton")
    got = apply_rotary(q, k, cos, sin)
    want = apply_rotary_reference(q, k, cos, sin)
    _check("rotary dispatch q", got[0], want[0], report)
    _check("rotary dispatch k", got[1], want[1], report)


@pytest.mark.cuda
def test_cuda_llada_shapes(report):
    """The 8B decode step: [16, 32, 4096] with per-sequence modulation; q/k [16, 32, 32, 128]."""
    x = _rand(16, 32, 4096, dtype=torch.bfloat16, device="cuda")
    w = _rand(4096, dtype=torch.bfloat16, device="cuda", seed=1)
    sh = _rand(16, 1, 4096, dtype=torch.bfloat16, device="cuda", seed=2)
    sc = _rand(16, 1, 4096, dtype=torch.bfloat16, device="cuda", seed=3) * 0.1
    _check("cuda rmsnorm", _rmsnorm_triton(x, w, 1e-5, sh, sc),
           rms_norm_reference(x, w, 1e-5, sh, sc), report)
    q = _rand(16, 32, 32, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = _rand(16, 32, 32, 128, dtype=torch.bfloat16, device="cuda", seed=1).transpose(1, 2)
    pos = torch.arange(1000, 1032, device="cuda")[None].expand(16, 32)
    cos, sin = rotary_cos_sin(pos, 128, 500000.0, dtype=torch.bfloat16)
    got, want = _rotary_triton(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)
    _check("cuda rotary q", got[0], want[0], report)
    _check("cuda rotary k", got[1], want[1], report)
