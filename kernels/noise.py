"""Counter-based random numbers for sampling: a pure function of (seed, position, step, index).

    u = uniform_noise(seeds, positions, steps, V)   # [N] x3 -> [N, V] floats in (0, 1)
    g = gumbel(u)                                   # Gumbel(0, 1) noise for Gumbel-max sampling

Why not torch.Generator: the noise a request sees must not depend on what else is in the batch,
on the order rows are processed, or on whether the Triton kernel or the torch reference draws it.
A stateless hash of the coordinates gives all three, and the Triton kernel computes the same
32-bit hash (lowbias32, Chris Wellons' integer hash) bit for bit.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
# Salts keep the per-token vocabulary noise and the per-position remasking noise independent.
SALT_VOCAB = 0x9E3779B9
SALT_POSITION = 0x85EBCA6B


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32)."""
    x = x & M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    return x ^ (x >> 16)


def row_key(seeds: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor,
            salt: int) -> torch.Tensor:
    """One 32-bit key per (seed, position, step): [N] int64."""
    k = hash32(seeds.long() ^ salt)
    k = hash32(k ^ positions.long())
    return hash32(k ^ steps.long())


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    # top 24 bits -> (0, 1), never exactly 0 or 1 so log(-log(u)) is finite
    return ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor,
                  vocab_size: int) -> torch.Tensor:
    key = row_key(seeds, positions, steps, SALT_VOCAB)  # [N]
    idx = torch.arange(vocab_size, device=key.device, dtype=torch.long)
    return to_uniform(hash32(key[:, None] ^ ((idx[None, :] * 0x27D4EB2F) & M32)))  # [N, V]


def position_noise(seeds: torch.Tensor, positions: torch.Tensor,
                   steps: torch.Tensor) -> torch.Tensor:
    """One uniform per position, for the `random` remasking rule: [N]."""
    return to_uniform(row_key(seeds, positions, steps, SALT_POSITION))


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))
