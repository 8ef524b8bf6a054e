"""Kernel tests run everywhere: on CUDA natively, on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any Triton kernel is defined (kernels/*_triton.py are imported
lazily, so setting it here, at collection, is early enough). The interpreter executes each tl op
as a numpy call: correct, slow, so CPU shapes stay small. Tests marked `cuda` skip without CUDA.
"""

import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _skip_cuda_only(request):
    if request.node.get_closest_marker("cuda") and not HAS_CUDA:
        pytest.skip("needs CUDA")
    # the interpreter evaluates both sides of tl.where in numpy; NaN on the discarded side warns
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)


@pytest.fixture
def device() -> str:
    return DEVICE


def abs_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| elementwise, in float64, where a non-finite value counts: a NaN or an
    infinity where the reference has anything else is an infinite error. The same non-finite
    value at the same place (NaN and NaN, +inf and +inf) is a match, because each kernel's
    contract is to return what its torch reference returns, and the references do return NaN
    for inputs without an answer (softmax of a row of -inf logits)."""
    g, w = got.double(), want.double()
    err = (g - w).abs()
    same_special = (g == w) | (torch.isnan(g) & torch.isnan(w))
    return torch.where(torch.isfinite(err), err, torch.where(same_special, 0.0, float("inf")))


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Print and return (max, mean) absolute error, the numbers a kernel change moves (inf when
    a non-finite value appears where the reference has another value; see abs_error)."""
    err = abs_error(got, want)
    mx = float(err.max()) if err.numel() else 0.0
    mean = float(err.mean()) if err.numel() else 0.0
    print(f"{name}: max abs err {mx:.3g}, mean {mean:.3g}")
    return mx, mean


@pytest.fixture
def report():
    return _report
