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


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Print and return (max, mean) absolute error, the numbers a kernel change moves."""
    err = (got.double() - want.double()).abs()
    finite = err[torch.isfinite(err)]
    mx = float(finite.max()) if finite.numel() else 0.0
    mean = float(finite.mean()) if finite.numel() else 0.0
    print(f"{name}: max abs err {mx:.3g}, mean {mean:.3g}")
    return mx, mean


@pytest.fixture
def report():
    return _report
