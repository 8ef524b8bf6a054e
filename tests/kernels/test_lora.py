"""The gathered LoRA matmuls (kernels/lora_triton.py) are pinned to their torch references, and
the references to the plain per-row definition, on awkward shapes and a mix of slots and none.

fp32 is exact up to summation order (atol 1e-5 at values ~1); bf16/fp16 round the inputs of the
dot products to the dtype as the reference's bmm does, but sum in fp32 in a different order:
a few ulp of the output.
"""

import pytest
import torch

from kernels.lora import (
    add_lora,
    gathered_linear_reference,
    lora_delta,
    lora_delta_reference,
)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.5).to(dtype).to(device)


def _per_row(x, a, b, slots):
    """The definition: row b adds x[b] @ A_s.T @ B_s.T for its slot s, nothing for -1."""
    out = torch.zeros(*x.shape[:-1], b.shape[1], dtype=torch.float64)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            out[i] = x[i].double() @ a[s].double().T @ b[s].double().T
    return out


SHAPES = [  # B, L, K, N, R, S: odd sizes, R below the tile, L and N across tiles
    (3, 7, 45, 37, 5, 4),
    (4, 1, 130, 67, 16, 3),
    (2, 33, 17, 129, 8, 2),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_per_row_definition(shape):
    B, L, K, N, R, S = shape
    x, a, b = (_rand(B, L, K, dtype=torch.float64, device="cpu"),
               _rand(S, R, K, dtype=torch.float64, device="cpu", seed=1),
               _rand(S, N, R, dtype=torch.float64, device="cpu", seed=2))
    slots = torch.tensor([(i % (S + 1)) - 1 for i in range(B)])  # -1, 0, 1, ...
    torch.testing.assert_close(lora_delta_reference(x, a, b, slots), _per_row(x, a, b, slots))
    assert lora_delta_reference(x, a, b, slots)[slots < 0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_add_lora_matches_reference(shape, dtype, device, report):
    from kernels import lora_triton

    B, L, K, N, R, S = shape
    x = _rand(B, L, K, dtype=dtype, device=device)
    a = _rand(S, R, K, dtype=dtype, device=device, seed=1)
    b = _rand(S, N, R, dtype=dtype, device=device, seed=2)
    base = _rand(B, L, N, dtype=dtype, device=device, seed=3)
    slots = torch.tensor([S - 1, -1, 0, 1][:B], device=device)
    want = base + lora_delta_reference(x, a, b, slots)
    got = lora_triton.add_lora(base.clone(), x, a, b, slots)
    rtol, atol = TOL[dtype]
    report(f"add_lora {shape} {dtype}", got, want)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    # rows without an adapter are left exactly as they were
    none = slots < 0
    assert torch.equal(got[none], base[none])


def test_triton_reads_strided_inputs_and_gathered_linear(device, report):
    from kernels import lora_triton

    B, L, K, N, S = 3, 5, 40, 23, 3
    x = _rand(B, K, L, dtype=torch.float32, device=device).transpose(1, 2)  # non-contiguous
    w = _rand(S, N, K, dtype=torch.float32, device=device, seed=4)
    slots = torch.tensor([2, 0, -1], device=device)
    got = lora_triton.gathered_linear(x, w, slots)
    want = gathered_linear_reference(x, w, slots)
    report("gathered_linear", got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[2].abs().max() == 0


def test_dispatch_keeps_gradients_on_the_reference(monkeypatch):
    """Training (model/train_lora.py) needs autograd: with a grad-requiring adapter the dispatch
    takes the reference even when Triton is forced."""
    monkeypatch.setenv("DLLM_KERNELS", "triton")
    x = torch.randn(2, 3, 8)
    a = torch.randn(1, 4, 8, requires_grad=True)
    b = torch.randn(1, 6, 4, requires_grad=True)
    slots = torch.tensor([0, -1])
    add_lora(torch.zeros(2, 3, 6), x, a, b, slots).sum().backward()
    assert a.grad is not None and b.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(lora_delta(x, a, b, slots),
                                   lora_delta_reference(x, a, b, slots), rtol=1e-5, atol=1e-5)
