"""The result of commit selection, shared by the torch reference and the Triton kernel.

Its own module so that kernels/commit_select.py (reference and dispatch) and
kernels/commit_select_triton.py (the kernel) both import it and neither imports the other at
module level: the dispatch imports the Triton module only when it chooses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CommitCandidates:
    """Per masked position (all [N]): the token to commit and three scores of the model's
    certainty, each from the untempered softmax(logits).

    tokens      int64: argmax, or the Gumbel-max sample at temperature > 0
    confidence  float32: p(token)
    margin      float32: p(top1) - p(top2)
    entropy     float32: entropy of the distribution (lower = surer)

    margin and entropy may be given as `derive`, a function computing both, called on first
    use: the common rule (low_confidence) reads only the confidence, and on the CPU the two
    extra passes over [N, V] cost a fifth of a 16-row denoising step."""

    def __init__(self, tokens: torch.Tensor, confidence: torch.Tensor,
                 margin: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                 derive: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        if (margin is None or entropy is None) and derive is None:
            raise ValueError("CommitCandidates needs margin and entropy, or derive")
        self.tokens, self.confidence = tokens, confidence
        self._margin, self._entropy, self._derive = margin, entropy, derive

    def _scores(self) -> None:
        if self._margin is None or self._entropy is None:
            self._margin, self._entropy = self._derive()
            self._derive = None  # drops the [N, V] logits it holds

    @property
    def margin(self) -> torch.Tensor:
        self._scores()
        return self._margin

    @property
    def entropy(self) -> torch.Tensor:
        self._scores()
        return self._entropy
