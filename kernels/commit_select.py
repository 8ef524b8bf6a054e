"""Commit selection: for each masked position, the token to commit and how sure the model is.

    cand = commit_candidates(logits, temperature, top_p, seeds, positions, steps)
    cand.tokens      [N]  argmax (temperature 0) or Gumbel-max sample of softmax(logits / T), top-p
    cand.confidence  [N]  p(token) under softmax(logits)   (LLaDA's low_confidence score)
    cand.margin      [N]  p(top1) - p(top2)                (Dream's topk_margin)
    cand.entropy     [N]  entropy of softmax(logits)       (Dream's entropy; lower = surer)

logits: [N, V] in any float dtype; temperature, top_p: floats or [N]; seeds, positions, steps: [N]
int64, the coordinates that key the noise (kernels/noise.py), so a row's sample never depends on
the other rows. The scores use the untempered distribution, as LLaDA's sampler does, so the commit
order at temperature 0 and T > 0 ranks the same quantities.

This runs on every masked position at every step and grows with the vocabulary (126k for LLaDA):
the torch reference materialises [N, V] probabilities several times; the Triton kernel does one
pass with an online softmax.
"""

from __future__ import annotations

import torch

from kernels.commit_types import CommitCandidates
from kernels.dispatch import use_triton
from kernels.noise import gumbel, uniform_noise

__all__ = ["CommitCandidates", "commit_candidates", "commit_candidates_reference", "top_p_filter"]


def _per_row(x, n: int, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).expand(n) if x.dim() == 0 else x.to(device, dtype)
    return torch.full((n,), float(x), device=device, dtype=dtype)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (per row); others -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # a token is dropped when the mass before it already reaches top_p (the top-1 always stays)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def commit_candidates_reference(logits, temperature, top_p, seeds, positions, steps) -> CommitCandidates:
    N, V = logits.shape
    lf = logits.float()
    temp = _per_row(temperature, N, lf.device)
    topp = _per_row(top_p, N, lf.device)
    logp = lf.log_softmax(-1)
    probs = logp.exp()
    top2 = probs.topk(min(2, V), dim=-1).values
    margin = top2[:, 0] - (top2[:, 1] if V > 1 else 0)
    entropy = -(probs * logp.clamp_min(-1e30)).sum(-1)
    tokens = lf.argmax(-1)
    sampled = temp > 0
    if bool(sampled.any()):
        rows = sampled.nonzero(as_tuple=True)[0]
        scaled = lf[rows] / temp[rows, None]
        filt = top_p_filter(scaled, topp[rows]) if bool((topp[rows] < 1).any()) else scaled
        g = gumbel(uniform_noise(seeds[rows], positions[rows], steps[rows], V))
        tokens = tokens.clone()
        tokens[rows] = (filt + g).argmax(-1)
    confidence = probs.gather(-1, tokens[:, None])[:, 0]
    return CommitCandidates(tokens, confidence, margin, entropy)


def commit_candidates(logits, temperature, top_p, seeds, positions, steps) -> CommitCandidates:
    if use_triton(logits):
        from kernels import commit_select_triton  # imported when chosen: triton is optional on CPU

        return commit_select_triton.commit_candidates(logits, temperature, top_p, seeds,
                                                      positions, steps)
    return commit_candidates_reference(logits, temperature, top_p, seeds, positions, steps)
