"""The result of commit selection, shared by the torch reference and the Triton kernel.

Its own module so that kernels/commit_select.py (reference and dispatch) and
kernels/commit_select_triton.py (the kernel) both import it and neither imports the other at
module level: the dispatch imports the Triton module only when it chooses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CommitCandidates:
    """Per masked position (all [N]): the token to commit and three scores of the model's
    certainty, each from the untempered softmax(logits)."""

    tokens: torch.Tensor  # int64: argmax, or the Gumbel-max sample at temperature > 0
    confidence: torch.Tensor  # float32: p(token)
    margin: torch.Tensor  # float32: p(top1) - p(top2)
    entropy: torch.Tensor  # float32: entropy of the distribution (lower = surer)
