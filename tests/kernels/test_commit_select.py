"""The Triton commit selection is pinned to the torch reference: same tokens, same scores.

Tokens must match exactly (argmax with first-index ties; Gumbel-max with the shared hash noise).
Scores (confidence, margin, entropy) are float32 results of different summation orders, so they
match within per-dtype tolerances; the logits' dtype only changes what is read, not the maths.
"""

import pytest
import torch

from kernels.commit_select import (
    CommitCandidates,
    commit_candidates,
    commit_candidates_reference,
    top_p_filter,
)
from kernels.noise import gumbel, uniform_noise

LLADA_VOCAB = 126464
# Scores are float32 whatever the logits' dtype: confidence/margin within 2e-6 absolute (they are
# at most 1), entropy within 1e-5 relative (a sum of V terms in another order; ~2.5e-5 absolute
# measured at V = 126464, H ~ 11.7).
PROB_ATOL, ENTROPY_RTOL = 2e-6, 1e-5


def _triton(*args, **kw):
    from kernels import commit_select_triton

    return commit_select_triton.commit_candidates(*args, **kw)


def _coords(n: int, device: str, offset: int = 0):
    seeds = torch.arange(n, device=device) * 1000003 + 7 + offset
    positions = torch.arange(n, device=device) * 13 + 1000
    steps = torch.arange(n, device=device) % 5
    return seeds, positions, steps


def _logits(n: int, v: int, dtype, device: str, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)


def _near_tie(logits, temperature, coords, row: int, a: int, b: int) -> bool:
    """Two Gumbel-max winners whose scores agree to float rounding (the log on another device
    may differ in the last bit); a real mismatch is far apart."""
    t = temperature[row] if isinstance(temperature, torch.Tensor) else temperature
    if float(t) <= 0:
        return False
    g = gumbel(uniform_noise(*(c[row:row + 1] for c in coords), logits.shape[1]))[0]
    score = logits[row].float() / float(t) + g
    return abs(float(score[a] - score[b])) <= 1e-5 * (1 + abs(float(score[a])))


def _compare(logits, temperature, top_p, report, name):
    n = logits.shape[0]
    coords = _coords(n, logits.device.type)
    want = commit_candidates_reference(logits, temperature, top_p, *coords)
    got = _triton(logits, temperature, top_p, *coords)
    mism = (got.tokens != want.tokens).nonzero().flatten().tolist()
    real = [r for r in mism if not _near_tie(logits, temperature, coords, r,
                                             int(got.tokens[r]), int(want.tokens[r]))]
    print(f"{name}: {n - len(mism)}/{n} tokens equal, {len(mism) - len(real)} near-ties")
    assert not real, f"{name}: tokens differ at rows {real}"
    same = got.tokens == want.tokens  # confidence is of the chosen token: compare like with like
    assert report(f"{name} confidence", got.confidence[same], want.confidence[same])[0] <= PROB_ATOL
    assert report(f"{name} margin", got.margin, want.margin)[0] <= PROB_ATOL
    report(f"{name} entropy", got.entropy, want.entropy)
    assert torch.allclose(got.entropy, want.entropy, rtol=ENTROPY_RTOL, atol=1e-6)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(7, 1823), (1, 5), (3, LLADA_VOCAB)])
def test_greedy_matches_reference(n, v, dtype, device, report):
    _compare(_logits(n, v, dtype, device), 0.0, 1.0, report, f"greedy {n}x{v} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(9, 2049), (3, LLADA_VOCAB)])
def test_gumbel_sample_matches_reference(n, v, dtype, device, report):
    _compare(_logits(n, v, dtype, device, seed=1), 0.8, 1.0, report, f"sample {n}x{v} {dtype}")


def test_per_row_settings_and_masked_vocab(device, report):
    """Rows mixing greedy, sampling and top-p, with banned tokens at -inf (as the sampler does)."""
    logits = _logits(8, 1000, torch.float32, device, seed=2)
    logits[:, :3] = float("-inf")
    logits[5, 400:] = float("-inf")
    temp = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.0, 1.0, 0.7, 1.5], device=device)
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.95, 0.3, 1.0, 0.2, 0.999], device=device)
    got = _compare(logits, temp, top_p, report, "mixed rows")
    assert bool((got.tokens >= 3).all())  # a banned token is never chosen


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_sample_matches_reference(top_p, device, report):
    # Flat logits and a small nucleus: the first pass's Gumbel winner is often outside it, so the
    # extra sampling pass runs too. fp32 logits have no ties at the nucleus boundary.
    logits = _logits(12, 1537, torch.float32, device, scale=1.0, seed=3)
    got = _compare(logits, 1.0, top_p, report, f"top_p {top_p}")
    # every sampled token lies in the reference's nucleus
    coords_free = top_p_filter(logits.float(), torch.full((12,), top_p, device=device))
    assert bool(torch.isfinite(coords_free.gather(1, got.tokens[:, None])).all())


def test_top_p_large_vocab(device, report):
    _compare(_logits(2, LLADA_VOCAB, torch.float32, device, seed=4), 0.9, 0.9, report,
             "top_p 126k")


def test_sample_does_not_depend_on_batch(device):
    """A request's tokens depend on its own (seed, position, step), not on its neighbours."""
    logits = _logits(6, 3001, torch.float32, device, seed=5)
    coords = _coords(6, device)
    full = _triton(logits, 1.0, 0.9, *coords).tokens
    part = _triton(logits[2:4], 1.0, 0.9, *(c[2:4] for c in coords)).tokens
    assert torch.equal(full[2:4], part)
    other_seed = _triton(logits, 1.0, 1.0, *_coords(6, device, offset=1)).tokens
    assert not torch.equal(other_seed, _triton(logits, 1.0, 1.0, *coords).tokens)


def test_non_contiguous_rows(device, report):
    base = _logits(5, 2 * 777, torch.float32, device, seed=6)
    _compare(base[:, ::2], 0.0, 1.0, report, "strided")
    _compare(base[:, :777], 1.0, 1.0, report, "row stride != V")


def test_dispatch_switch(device, monkeypatch):
    logits = _logits(3, 257, torch.float32, device, seed=7)
    coords = _coords(3, device)
    monkeypatch.setenv("DLLM_KERNELS", "torch")
    a = commit_candidates(logits, 0.0, 1.0, *coords)
    monkeypatch.setenv("DLLM_KERNELS", "triton")
    b = commit_candidates(logits, 0.0, 1.0, *coords)
    assert torch.equal(a.tokens, b.tokens)
    monkeypatch.setenv("DLLM_KERNELS", "bogus")
    with pytest.raises(ValueError):
        commit_candidates(logits, 0.0, 1.0, *coords)


@pytest.mark.parametrize("field", ["confidence", "margin", "entropy"])
def test_comparison_fails_on_an_all_nan_candidate(field, device, report):
    """The pin can fail: a kernel whose scores came out NaN is caught (errors that are not
    finite count as infinite, they are not dropped)."""
    logits = _logits(4, 301, torch.float32, device, seed=9)

    def nan_kernel(*args):
        want = commit_candidates_reference(*args)
        scores = {f: getattr(want, f) for f in ("confidence", "margin", "entropy")}
        scores[field] = torch.full_like(scores[field], float("nan"))
        return CommitCandidates(want.tokens, **scores)

    real = globals()["_triton"]
    globals()["_triton"] = nan_kernel
    try:
        with pytest.raises(AssertionError):
            _compare(logits, 0.0, 1.0, report, f"all-NaN {field}")
    finally:
        globals()["_triton"] = real


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0)
def test_row_without_a_finite_logit_is_nan_in_both(device, report):
    """Every token banned in a row: no distribution, so the reference's scores are NaN there,
    and the kernel's contract is the same NaN at the same place (and token 0); other rows are
    unaffected."""
    logits = _logits(3, 500, torch.float32, device, seed=10)
    logits[1] = float("-inf")
    coords = _coords(3, device)
    for temperature in (0.0, 1.0):
        want = commit_candidates_reference(logits, temperature, 1.0, *coords)
        got = _triton(logits, temperature, 1.0, *coords)
        assert torch.equal(got.tokens, want.tokens) and int(got.tokens[1]) == 0
        for f, atol in (("confidence", PROB_ATOL), ("margin", PROB_ATOL),
                        ("entropy", ENTROPY_RTOL * float(want.entropy[0]))):
            g, w = getattr(got, f), getattr(want, f)
            assert bool(w[1].isnan()) and bool(w[[0, 2]].isfinite().all())
            assert report(f"all banned T={temperature} {f}", g, w)[0] <= atol


@pytest.mark.cuda
@pytest.mark.parametrize("temperature,top_p,dtype", [
    (0.0, 1.0, torch.bfloat16), (1.0, 1.0, torch.bfloat16), (0.0, 1.0, torch.float32),
    # top-p in fp32: bf16 ties at the nucleus boundary are kept whole by the kernel (docstring)
    (0.7, 0.9, torch.float32)])
def test_cuda_engine_shape(temperature, top_p, dtype, report):
    """The engine's batch-16 step: 512 rows of LLaDA's vocabulary."""
    _compare(_logits(512, LLADA_VOCAB, dtype, "cuda", seed=8), temperature, top_p,
             report, f"cuda 512x{LLADA_VOCAB} {dtype} T={temperature} p={top_p}")
