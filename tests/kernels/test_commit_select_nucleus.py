"""Nucleus scoring (Dream / Fast-dLLM v2): the Triton kernel equals the torch reference, and the
reference equals Dream's `sample_tokens` written out here.

Rows flagged `sampled_scores` are scored on q = softmax(top_p(logits / T)) (at T = 0 the logits
themselves, still truncated), with Dream's entropy sum q log(q + 1e-10). Tokens must match
exactly; scores within the float32 tolerances of tests/kernels/test_commit_select.py.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.commit_select import commit_candidates_reference

PROB_ATOL, ENTROPY_ATOL = 2e-6, 2e-5


def _coords(n):
    return (torch.arange(n) * 1000003 + 7, torch.arange(n) * 13 + 1000, torch.arange(n) % 5)


def _logits(n, v, seed=0, scale=3.0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def dream_scores(logits, temperature, top_p):
    """Dream's generation_utils.sample_tokens (confidence, margin and neg-entropy branches) at
    T = 0 (argmax) -- written from the published code: temperature divides when > 0, top_p
    removes the sorted tokens whose preceding mass exceeds top_p (finfo.min, not -inf)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    sp, _ = torch.sort(probs, dim=-1, descending=True)
    margin = sp[:, 0] - sp[:, 1]
    neg_entropy = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return x0, confidence, margin, neg_entropy


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5])
def test_reference_equals_dreams_sample_tokens_at_t0(top_p):
    lf = _logits(6, 300)
    want = dream_scores(lf, 0.0, top_p)
    got = commit_candidates_reference(lf, 0.0, top_p, *_coords(6),
                                      sampled_scores=torch.ones(6, dtype=torch.bool))
    assert torch.equal(got.tokens, want[0])
    torch.testing.assert_close(got.confidence, want[1], atol=1e-7, rtol=0)
    torch.testing.assert_close(got.margin, want[2], atol=1e-7, rtol=0)
    torch.testing.assert_close(-got.entropy, want[3], atol=1e-6, rtol=0)
    raw = commit_candidates_reference(lf, 0.0, top_p, *_coords(6))
    if top_p < 1:  # the raw scores differ: this is what the mode changes
        assert not torch.allclose(raw.confidence, got.confidence)


def test_reference_scores_the_tempered_nucleus_of_the_drawn_token():
    lf = _logits(5, 200, seed=1)
    T, p = 0.7, 0.9
    got = commit_candidates_reference(lf, T, p, *_coords(5),
                                      sampled_scores=torch.ones(5, dtype=torch.bool))
    raw = commit_candidates_reference(lf, T, p, *_coords(5))
    assert torch.equal(got.tokens, raw.tokens)  # scoring never changes the draw
    q = dream_scores(lf, T, p)  # its confidence is of the argmax; ours of the drawn token
    z = lf / T
    sorted_z, idx = z.sort(-1, descending=True)
    cum = sorted_z.softmax(-1).cumsum(-1)
    keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, idx, (cum - sorted_z.softmax(-1)) < p)
    qz = z.masked_fill(~keep, float("-inf")).softmax(-1)
    torch.testing.assert_close(got.confidence, qz.gather(-1, got.tokens[:, None])[:, 0])
    torch.testing.assert_close(got.margin, q[2])
    torch.testing.assert_close(-got.entropy, q[3], atol=1e-6, rtol=0)


def _triton(*args, **kw):
    from kernels import commit_select_triton

    return commit_select_triton.commit_candidates(*args, **kw)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.0, 0.9), (0.8, 1.0), (0.8, 0.9)])
def test_triton_nucleus_scores_match_reference(temperature, top_p, device, report):
    n, v = 7, 1823
    lf = _logits(n, v, seed=2).to(device)
    coords = tuple(c.to(device) for c in _coords(n))
    flags = (torch.arange(n) % 3 != 1).to(device)  # mixed rows: nucleus and raw in one launch
    want = commit_candidates_reference(lf, temperature, top_p, *coords, sampled_scores=flags)
    got = _triton(lf, temperature, top_p, *coords, sampled_scores=flags)
    assert torch.equal(got.tokens, want.tokens)
    name = f"nucleus T={temperature} p={top_p}"
    assert report(f"{name} confidence", got.confidence, want.confidence)[0] <= PROB_ATOL
    assert report(f"{name} margin", got.margin, want.margin)[0] <= PROB_ATOL
    assert report(f"{name} entropy", got.entropy, want.entropy)[0] <= ENTROPY_ATOL


@pytest.mark.cuda
@pytest.mark.parametrize("temperature,top_p", [(0.0, 0.95), (0.2, 0.95)])  # Dream's defaults
def test_cuda_nucleus_scores_at_dream_vocab(temperature, top_p, report):
    """The engine's shape on a GPU: 512 masked positions x Dream's 152064-token vocabulary,
    bfloat16 logits (benchmarks/gpu_check.py runs it with the other CUDA kernel tests)."""
    n, v = 512, 152064
    lf = _logits(n, v, seed=3).to(torch.bfloat16).cuda()
    coords = tuple(c.cuda() for c in _coords(n))
    flags = torch.ones(n, dtype=torch.bool, device="cuda")
    want = commit_candidates_reference(lf, temperature, top_p, *coords, sampled_scores=flags)
    got = _triton(lf, temperature, top_p, *coords, sampled_scores=flags)
    same = got.tokens == want.tokens
    assert int(same.sum()) >= n - 2  # Gumbel near-ties on another device's log may differ
    name = f"nucleus 512x{v} T={temperature}"
    assert report(f"{name} confidence", got.confidence[same], want.confidence[same])[0] <= PROB_ATOL
    assert report(f"{name} margin", got.margin, want.margin)[0] <= PROB_ATOL
    assert report(f"{name} entropy", got.entropy, want.entropy)[0] <= 1e-4
