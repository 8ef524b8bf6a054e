"""Which tokens a step may predict and which end an answer: the sampling rules, once.

    stops = stop_token_ids(cfg, params.stop_token_ids)     # {eos, eot} unless the request says
    banned = banned_token_ids(cfg, params.suppress_token_ids)
    ban_tokens(logits, [banned] * B)                        # logits [B, M, V], in place
    if constrains_first_token(params.first_token_ids, block):
        constrain_first_position(logits[i, 0], params.first_token_ids)

The reference sampler (model/sampling.py) and the engine (engine/sequence.py, engine/batch.py)
both apply these, which is part of why their tokens are equal.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


def stop_token_ids(cfg: ModelConfig, requested: list[int] | None) -> set[int]:
    """The tokens that end an answer: the request's list, or by default the model's EOS and
    end-of-turn. An empty list means none (generate to the length limit)."""
    if requested is not None:
        return set(requested)
    return {cfg.eos_id} | ({cfg.eot_id} if cfg.eot_id is not None else set())


def banned_token_ids(cfg: ModelConfig, suppress: list[int]) -> list[int]:
    """Token ids whose logits are -inf at every step, sorted: the mask token (never a
    prediction), PAD unless it is also EOS (LLaDA and Dream share the id, and EOS must stay
    predictable), and the request's suppress list. Ids outside the vocabulary are dropped."""
    banned = {cfg.mask_id, *suppress}
    if cfg.pad_id is not None and cfg.pad_id != cfg.eos_id:
        banned.add(cfg.pad_id)
    return sorted(b for b in banned if 0 <= b < cfg.vocab_size)


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> None:
    """In place: -inf for row i's banned ids at every position. logits [B, M, V]."""
    B, _, V = logits.shape
    hit = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    for i, ids in enumerate(banned):
        hit[i, ids] = True
    logits.masked_fill_(hit[:, None, :], float("-inf"))


def constrains_first_token(first_token_ids: list[int] | None, block: int) -> bool:
    """Token healing: the first generated token (canvas position 0, in block 0) must be one of
    first_token_ids, when the request gives them."""
    return bool(first_token_ids) and block == 0


def constrain_first_position(logits: torch.Tensor, allowed: list[int]) -> None:
    """In place: -inf for every token but `allowed`. logits [..., V] of canvas position 0."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.tensor(allowed, device=logits.device)] = True
    logits.masked_fill_(~keep, float("-inf"))


__all__ = ["ban_tokens", "banned_token_ids", "constrain_first_position",
           "constrains_first_token", "stop_token_ids"]
