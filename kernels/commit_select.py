"""Commit selection: for each masked position, the token to commit and how sure the model is.

    cand = commit_candidates(logits, temperature, top_p, seeds, positions, steps)
    cand.tokens      [N]  argmax (temperature 0) or Gumbel-max sample of softmax(logits / T), top-p
    cand.confidence  [N]  p(token) under softmax(logits)   (LLaDA's low_confidence score)
    cand.margin      [N]  p(top1) - p(top2)                (Dream's topk_margin)
    cand.entropy     [N]  entropy of softmax(logits)       (Dream's entropy; lower = surer)

logits: [N, V] in any float dtype; temperature, top_p: floats or [N]; seeds, positions, steps: [N]
int64, the coordinates that key the noise (kernels/noise.py), so a row's sample never depends on
the other rows. The scores use the untempered distribution, as LLaDA's sampler does, so the commit
order at temperature 0 and T > 0 ranks the same quantities; rows flagged in `sampled_scores`
are scored instead on the distribution the token is drawn from, softmax(top_p(logits / T)),
as Dream and Fast-dLLM v2 do (`nucleus_scores`; at T = 0 the logits themselves, truncated).
Rows with top_p = 1 are never truncated, as in the Triton kernel.

This runs on every masked position at every step and grows with the vocabulary (126k for LLaDA):
the torch reference reads [N, V] twice for what every rule needs (argmax, log-normaliser) and
computes the margin and entropy only when a rule reads them; the Triton kernel does one pass
with an online softmax.
"""

from __future__ import annotations

import torch

from kernels.commit_types import CommitCandidates
from kernels.dispatch import use_triton
from kernels.noise import gumbel, uniform_noise

__all__ = ["CommitCandidates", "commit_candidates", "commit_candidates_reference",
           "nucleus_scores", "tempered_nucleus", "top_p_filter"]


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


def tempered_nucleus(lf: torch.Tensor, temp: torch.Tensor, topp: torch.Tensor) -> torch.Tensor:
    """The logits a sampler draws from: lf / T (lf itself at T = 0), -inf outside the top_p
    nucleus for rows with top_p < 1. lf [n, V] float32, temp/topp [n] -> [n, V]."""
    z = lf / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    cut = topp < 1
    if bool(cut.any()):
        z = torch.where(cut[:, None], top_p_filter(z, topp), z)
    return z


def nucleus_scores(z: torch.Tensor, tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores on q = softmax(z), z from tempered_nucleus, as Dream's sample_tokens computes them
    (its entropy with +1e-10 inside the log). -> (q(token), q1 - q2, -sum q log(q + 1e-10))."""
    q = z.softmax(-1)
    top2 = q.topk(min(2, q.shape[-1]), dim=-1).values
    margin = top2[:, 0] - (top2[:, 1] if q.shape[-1] > 1 else 0)
    entropy = -(q * (q + 1e-10).log()).sum(-1)  # Dream's epsilon, so its scores are ours
    return q.gather(-1, tokens[:, None])[:, 0], margin, entropy


def commit_candidates_reference(logits, temperature, top_p, seeds, positions, steps,
                                sampled_scores=None) -> CommitCandidates:
    N, V = logits.shape
    lf = logits.float()
    temp = _per_row(temperature, N, lf.device)
    topp = _per_row(top_p, N, lf.device)
    # two passes for what every rule reads (argmax, log-normaliser); margin and entropy only
    # when a rule asks for them (CommitCandidates.derive)
    tokens = lf.max(-1).indices  # the first maximum, as argmax
    lse = lf.logsumexp(-1)
    sampled = temp > 0
    scored = sampled_scores.to(lf.device, torch.bool) if sampled_scores is not None \
        else torch.zeros_like(sampled)
    need = sampled | scored  # rows that need the tempered nucleus: computed once for both
    z = rows = None
    if bool(need.any()):
        rows = need.nonzero(as_tuple=True)[0]
        z = tempered_nucleus(lf[rows], temp[rows], topp[rows])  # [n, V]
        draw = sampled[rows]
        if bool(draw.any()):
            r = rows[draw]
            g = gumbel(uniform_noise(seeds[r], positions[r], steps[r], V))
            tokens = tokens.clone()
            tokens[r] = (z[draw] + g).argmax(-1)
    confidence = (lf.gather(-1, tokens[:, None])[:, 0] - lse).exp()

    def raw_scores() -> tuple[torch.Tensor, torch.Tensor]:
        logp = lf - lse[:, None]
        probs = logp.exp()
        top2 = probs.topk(min(2, V), dim=-1).values
        margin = top2[:, 0] - (top2[:, 1] if V > 1 else 0)
        return margin, -(probs * logp.clamp_min(-1e30)).sum(-1)

    if not bool(scored.any()):
        return CommitCandidates(tokens, confidence, derive=raw_scores)
    keep = scored[rows]
    r = rows[keep]
    c, m, e = nucleus_scores(z[keep], tokens[r])
    margin, entropy = raw_scores()
    confidence, margin, entropy = (x.clone().index_put_((r,), y) for x, y in
                                   ((confidence, c), (margin, m), (entropy, e)))
    return CommitCandidates(tokens, confidence, margin, entropy)


def commit_candidates(logits, temperature, top_p, seeds, positions, steps,
                      sampled_scores=None) -> CommitCandidates:
    """sampled_scores: None, or bool [N]: rows scored on the tempered, top_p-truncated
    distribution (model/sampling.py ScoringMode) instead of the raw softmax."""
    if use_triton(logits):
        from kernels import commit_select_triton  # imported when chosen: triton is optional on CPU

        return commit_select_triton.commit_candidates(logits, temperature, top_p, seeds,
                                                      positions, steps,
                                                      sampled_scores=sampled_scores)
    return commit_candidates_reference(logits, temperature, top_p, seeds, positions, steps,
                                       sampled_scores)
