"""Masked-diffusion maths: forward noising, the NELBO loss, block-diffusion training layout.

    xt, masked = q_xt(x0, t, maskable, mask_id, generator)           # forward process
    loss, stats = diffusion_loss(net, x0, prompt_len, block_length)   # one training batch

Forward process (linear schedule): each response token is replaced by the mask token with
probability t. The loss is the continuous-time NELBO: cross-entropy on masked positions weighted
by 1/t, normalised by the number of response tokens; prompt tokens are never masked.

Block diffusion (BD3-LM): every block draws its own t and attends to the *clean* earlier blocks.
One pass trains all blocks at once by feeding [noisy copy ; clean copy] with the mask of
`block_diffusion_mask`: noisy block b sees noisy block b and clean blocks < b; clean block b sees
clean blocks <= b. The prompt is segment 0 (bidirectional within itself), the response is cut
into blocks of `block_length` starting right after it, as at inference. The loss's attention
context is kernels.attention.BlockDiffusionAttention: this rule as a FlexAttention block mask
on CUDA, as this dense mask elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention import BlockDiffusionAttention
from model.transformer import DiffusionTransformer


def segment_ids(seq_len: int, prompt_len: torch.Tensor, block_length: int) -> torch.Tensor:
    """[B] prompt lengths -> [B, L] segment of each position: 0 = prompt, b >= 1 = response block."""
    pos = torch.arange(seq_len, device=prompt_len.device)[None, :]
    rel = pos - prompt_len[:, None]
    return torch.where(rel < 0, torch.zeros_like(rel), 1 + rel.clamp_min(0) // block_length)


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """Single copy, inference layout: a token sees segments <= its own. [B, L] -> [B, 1, L, L]."""
    return (seg[:, None, :] <= seg[:, :, None])[:, None]


def block_diffusion_mask(seg: torch.Tensor) -> torch.Tensor:
    """[noisy ; clean] training layout: [B, L] segments -> bool [B, 1, 2L, 2L]."""
    sq, sk = seg[:, :, None], seg[:, None, :]
    noisy_noisy = sq == sk
    noisy_clean = sk < sq
    clean_clean = sk <= sq
    clean_noisy = torch.zeros_like(noisy_noisy)
    top = torch.cat([noisy_noisy, noisy_clean], dim=2)
    bottom = torch.cat([clean_noisy, clean_clean], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


def q_xt(x0: torch.Tensor, t: torch.Tensor, maskable: torch.Tensor, mask_id: int,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token with probability t (t broadcastable to x0). -> (xt, masked)."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (u < t) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def masked_fraction(masked: torch.Tensor, seg: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Per-token fraction of its segment that is masked: the t the network is conditioned on,
    computed the same way the sampler computes it for the active block. [B, L] -> [B, L]."""
    B = seg.shape[0]
    cnt = torch.zeros(B, n_segments, device=seg.device).scatter_add_(1, seg, masked.float())
    tot = torch.zeros(B, n_segments, device=seg.device).scatter_add_(1, seg, torch.ones_like(masked, dtype=torch.float))
    return (cnt / tot.clamp_min(1)).gather(1, seg)


def diffusion_loss(net: DiffusionTransformer, x0: torch.Tensor, prompt_len: torch.Tensor,
                   block_length: int | None = None, eps: float = 1e-3,
                   generator: torch.Generator | None = None,
                   loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """x0: [B, L] clean tokens; prompt_len: [B]. Returns (loss, stats).

    loss_mask: optional bool [B, L], False for positions that count neither as masked targets nor
    in the normaliser (padding)."""
    cfg = net.cfg
    B, L = x0.shape
    dev = x0.device
    pos = torch.arange(L, device=dev)[None, :].expand(B, L)
    response = pos >= prompt_len[:, None]
    if loss_mask is not None:
        response = response & loss_mask
    if cfg.attention == "block_causal":
        bl = block_length or cfg.block_length
        seg = segment_ids(L, prompt_len, bl)
        n_seg = int(seg.max()) + 1
        t_seg = eps + (1 - eps) * torch.rand(B, n_seg, generator=generator, device=dev)
        t = t_seg.gather(1, seg)  # [B, L]: each block its own t
        xt, masked = q_xt(x0, t, response, cfg.mask_id, generator)
        t_cond = masked_fraction(masked, seg, n_seg) * response
        ids = torch.cat([xt, x0], dim=1)
        logits = net(ids, positions=torch.cat([pos, pos], dim=1),
                     t=torch.cat([t_cond, torch.zeros_like(t_cond)], dim=1),
                     attn=BlockDiffusionAttention(seg), logits_slice=slice(0, L))
    else:
        t = (eps + (1 - eps) * torch.rand(B, 1, generator=generator, device=dev)).expand(B, L)
        xt, masked = q_xt(x0, t, response, cfg.mask_id, generator)
        t_cond = masked.float().sum(1, keepdim=True) / response.sum(1, keepdim=True).clamp_min(1)
        logits = net(xt, positions=pos, t=(t_cond * response) if cfg.time_conditioning else None)
    # logits: [B, L, V]; only masked positions carry a target
    ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")
    n_resp = response.sum().clamp_min(1)
    loss = (ce / t[masked]).sum() / n_resp
    with torch.no_grad():
        stats = {"loss": float(loss), "masked_ce": float(ce.mean()) if ce.numel() else 0.0,
                 "masked_tokens": int(masked.sum()), "response_tokens": int(n_resp)}
    return loss, stats
