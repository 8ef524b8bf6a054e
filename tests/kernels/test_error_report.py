"""The error helper every kernel test reports through counts non-finite values.

It once dropped them, so a kernel returning all NaN reported "max abs err 0" and passed.
"""

import math

import torch

from tests.kernels.conftest import abs_error

NAN, INF = float("nan"), float("inf")


def test_all_nan_candidate_is_an_infinite_error(report):
    want = torch.rand(6)
    mx, mean = report("all NaN", torch.full((6,), NAN), want)
    assert math.isinf(mx) and math.isinf(mean)


def test_one_nan_or_inf_where_the_reference_is_finite_fails(report):
    want = torch.rand(5)
    for bad in (NAN, INF, -INF):
        got = want.clone()
        got[3] = bad
        assert math.isinf(report(f"one {bad}", got, want)[0])


def test_the_same_special_value_at_the_same_place_matches():
    got = torch.tensor([NAN, INF, -INF, 0.5])
    assert torch.equal(abs_error(got, got.clone()), torch.zeros(4, dtype=torch.float64))
    # NaN in the reference is an answer too: a finite value there is wrong, as is the wrong inf
    err = abs_error(torch.tensor([0.5, -INF, 1.0]), torch.tensor([NAN, INF, 1.25]))
    assert err.tolist() == [INF, INF, 0.25]
