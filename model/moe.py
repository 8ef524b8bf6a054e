"""Mixture-of-experts layer shared by every MoE family (LLaDA2.x, LLaDA-MoE, SDAR-MoE, DiffusionGemma).

    ids, w = route_softmax_topk(logits, top_k, norm_topk_prob=True)     # Qwen3-MoE / OLMoE
    ids, w = route_softmax_topk(logits, top_k, expert_bias=b)           # LLaDA-MoE
    ids, w = route_sigmoid_group_topk(logits, top_k, expert_bias=b, n_group=8, topk_group=4,
                                      routed_scaling_factor=2.5)        # LLaDA2.x
    y = expert_ffn(x, ids, w, w_gate_up, w_down, act="silu")            # fast path  [T, d]
    y = expert_ffn_reference(x, ids, w, w_gate_up, w_down)              # per-expert loop, same maths

    moe = MoE(d_model=64, n_experts=8, top_k=2, expert_hidden=32, router="softmax")
    y = moe(x)                                                          # [B, L, d] -> [B, L, d]

Expert weights are fused 3-D tensors, the layout transformers 5.x uses for Qwen3-MoE/OLMoE:
`w_gate_up` [E, 2*I, d] (the I gate rows, then the I up rows) and `w_down` [E, d, I]. Each
expert is a gated MLP: down(act(gate x) * up x); a token's output is the sum over its k experts
of the router weight times that expert's output.

The fast path sorts the (token, slot) pairs by expert and runs the experts' matmuls as two
grouped GEMMs (`torch.nn.functional.grouped_mm`, which torch 2.13 offers on CUDA for bf16 and on
the CPU for fp32/bf16/fp16) with no Python loop over experts and no host sync. Grouped GEMM needs
every row stride a multiple of 16 bytes (d and I multiples of 4 fp32 / 8 bf16 elements); where
that or the dtype rules it out, a padded batched matmul over [E, C, d] runs instead (C = the
busiest expert's pair count: one host sync per layer, the price of a static bmm shape).

Expert parallelism (tensor-parallel serving, model/parallel.py): a rank holds experts
[expert_offset, expert_offset + E_local) and computes only the pairs routed to them; pairs routed
elsewhere contribute 0 and the ranks' partial outputs are summed by the row-parallel all-reduce
that follows the MLP. Why experts are split whole rather than column/row-split inside each
expert: the experts are narrow (LLaDA2.0-mini 256 experts of width 512, flash 256 of 1024), so
an 8-way split of each would leave 64-128-column GEMMs per expert on every rank; whole experts
keep each GEMM at its full width, spread the weights evenly, and cost the same one all-reduce.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Activation = Literal["silu", "gelu_tanh"]
RouterKind = Literal["softmax", "sigmoid_group"]

__all__ = ["MoE", "expert_ffn", "expert_ffn_reference", "route_softmax_topk",
           "route_sigmoid_group_topk", "grouped_mm_supported"]


def _act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown expert activation {act!r}; expected 'silu' or 'gelu_tanh'")


# --- routers ---------------------------------------------------------------------------------
def route_softmax_topk(router_logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool = False,
                       expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router (Qwen3-MoE, OLMoE, SDAR-MoE; LLaDA-MoE with `expert_bias`).

    router_logits: [T, E]. Softmax in fp32; LLaDA-MoE adds `expert_bias` [E] to the
    probabilities and the biased values are both what top-k ranks and the weights (its authors'
    code). norm_topk_prob renormalises the k weights to sum to 1 (Qwen3-MoE's flag).
    Returns topk_ids [T, k] (long) and topk_weights [T, k] (fp32)."""
    scores = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    if expert_bias is not None:
        scores = scores + expert_bias.float()
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def route_sigmoid_group_topk(router_logits: torch.Tensor, top_k: int, *,
                             expert_bias: torch.Tensor | None, n_group: int, topk_group: int,
                             routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited sigmoid router with expert bias (LLaDA2.x / BailingMoeV2, DeepSeek-V3 style).

    router_logits: [T, E], E = n_group * (experts per group). Scores are sigmoid(logits) in fp32;
    the choice ranks scores + expert_bias: each group is rated by the sum of its two best biased
    scores, the `topk_group` best groups stay eligible, and the top_k biased scores among them are
    chosen. The weights are the UNbiased sigmoid scores of the chosen experts, normalised to sum
    to 1 when norm_topk_prob and top_k > 1 (LLaDA2's code always does), times
    routed_scaling_factor. Returns topk_ids [T, k] (long), topk_weights [T, k] (fp32)."""
    T, E = router_logits.shape
    if E % n_group:
        raise ValueError(f"{E} experts do not split into {n_group} groups")
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        per_group = choice.view(T, n_group, E // n_group)
        group_score = per_group.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [T, G]
        keep = torch.topk(group_score, topk_group, dim=-1, sorted=False).indices  # [T, G']
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * routed_scaling_factor


# --- experts ---------------------------------------------------------------------------------
def expert_ffn_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         w_gate_up: torch.Tensor, w_down: torch.Tensor, act: Activation = "silu",
                         *, expert_offset: int = 0) -> torch.Tensor:
    """The reference: a plain loop over the experts this rank holds.

    x: [T, d]; topk_ids, topk_weights: [T, k] (global expert ids); w_gate_up: [E_local, 2*I, d];
    w_down: [E_local, d, I]; experts [expert_offset, expert_offset + E_local) are held here, pairs
    routed elsewhere add 0. Returns [T, d] in x's dtype, accumulated in fp32."""
    T, d = x.shape
    n_local, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    out = torch.zeros(T, d, dtype=torch.float32, device=x.device)
    for e in range(n_local):
        tok, slot = torch.where(topk_ids == expert_offset + e)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ w_gate_up[e].t()  # [n, 2I]
        h = _act(gu[:, :inter], act) * gu[:, inter:]
        y = h @ w_down[e].t()  # [n, d]
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)


def grouped_mm_supported(x: torch.Tensor, w_gate_up: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: it exists, the dtype is one it runs on
    this device, and every row stride (d, I, 2I) is a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or x.dtype != w_gate_up.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    d, inter = x.shape[-1], w_gate_up.shape[1] // 2
    return d % align == 0 and inter % align == 0


def _sort_pairs(topk_ids: torch.Tensor, n_local: int, expert_offset: int):
    """(token, slot) pairs sorted by local expert. Pairs for experts not held here go last, to an
    overflow bucket n_local. Returns order [T*k] (flat pair index), local ids sorted [T*k],
    counts [n_local + 1]."""
    local = topk_ids.reshape(-1) - expert_offset  # [T*k]
    local = torch.where((local >= 0) & (local < n_local), local, torch.full_like(local, n_local))
    order = torch.argsort(local, stable=True)
    # scatter_add, not bincount: CUDA's bincount reads the max on the host (a sync that would
    # also break CUDA-graph capture)
    counts = torch.zeros(n_local + 1, dtype=torch.long, device=local.device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    return order, local[order], counts


def expert_ffn(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor, act: Activation = "silu", *,
               expert_offset: int = 0, impl: Literal["auto", "grouped", "padded"] = "auto"
               ) -> torch.Tensor:
    """The fast path, same signature and result as expert_ffn_reference, no loop over experts.

    impl "grouped": two grouped GEMMs over the pairs sorted by expert (no host sync);
    "padded": one bmm over [E_local, C, d] with C the busiest expert's count; "auto": grouped
    where grouped_mm_supported, else padded."""
    T, d = x.shape
    k = topk_ids.shape[1]
    n_local, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    if T == 0:
        return x.new_zeros(T, d)
    if impl == "auto":
        impl = "grouped" if grouped_mm_supported(x, w_gate_up) else "padded"
    order, local_sorted, counts = _sort_pairs(topk_ids, n_local, expert_offset)
    token_of = order // k  # [P] token of each sorted pair, P = T*k
    weight = topk_weights.reshape(-1)[order].float()  # [P]
    valid = local_sorted < n_local  # [P] pairs held on this rank
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    xs = x[token_of]  # [P, d]
    if impl == "grouped":
        offs = counts[:n_local].cumsum(0).to(torch.int32)  # end of each expert's rows
        gu = F.grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs)  # [P, 2I]
        h = _act(gu[:, :inter], act) * gu[:, inter:]
        y = F.grouped_mm(h, w_down.transpose(1, 2), offs=offs)  # [P, d]
        # rows past offs[-1] (pairs held elsewhere) are uninitialised: select, never multiply
        y = torch.where(valid[:, None], y.float() * weight[:, None], torch.zeros((), device=x.device))
    elif impl == "padded":
        start = torch.cumsum(counts, 0) - counts  # [n_local + 1] first sorted row of each expert
        rank = torch.arange(order.numel(), device=x.device) - start[local_sorted]  # [P] row within expert
        cap = int(counts[:n_local].max()) if n_local else 0  # host sync: bmm needs a static C
        if cap == 0:
            return x.new_zeros(T, d)
        slot = torch.where(valid, local_sorted * cap + rank, torch.full_like(rank, n_local * cap))
        buf = x.new_zeros(n_local * cap + 1, d)  # +1: a sink row for pairs held elsewhere
        buf[slot] = xs
        gu = torch.bmm(buf[:-1].view(n_local, cap, d), w_gate_up.transpose(1, 2))  # [E, C, 2I]
        h = _act(gu[..., :inter], act) * gu[..., inter:]
        yb = torch.bmm(h, w_down.transpose(1, 2)).reshape(n_local * cap, d)  # [E*C, d]
        yb = torch.cat([yb, yb.new_zeros(1, d)])
        y = yb[slot].float() * weight[:, None]
    else:
        raise ValueError(f"unknown expert_ffn impl {impl!r}")
    out = torch.zeros(T, d, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, y)
    return out.to(x.dtype)


# --- the layer -------------------------------------------------------------------------------
class SharedExpert(nn.Module):
    """A dense gated MLP every token goes through (LLaDA2's shared_experts, LLaDA-MoE's
    shared_expert); names as the dense MLP (w1 gate, w3 up, w2 down) so TP shards it the same."""

    def __init__(self, d_model: int, hidden: int, act: Activation = "silu"):
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(_act(self.w1(x), self.act) * self.w3(x))


class MoE(nn.Module):
    """Router + routed experts (fused [E, ...] parameters) + optional shared expert.

    router "softmax": route_softmax_topk (norm_topk_prob, expert_bias added to probabilities);
    "sigmoid_group": route_sigmoid_group_topk (n_group, topk_group, routed_scaling_factor).
    Parameters: gate.weight [E, d] (router), expert_bias [E] (when expert_bias=True),
    w_gate_up [E_local, 2*I, d], w_down [E_local, d, I], shared.{w1,w3,w2} (when shared_hidden).
    `impl` picks the expert path: "auto" (fast), "grouped", "padded" or "reference"."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, expert_hidden: int, *,
                 router: RouterKind = "softmax", norm_topk_prob: bool = False,
                 expert_bias: bool = False, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, shared_hidden: int = 0,
                 act: Activation = "silu"):
        super().__init__()
        if router not in ("softmax", "sigmoid_group"):
            raise ValueError(f"unknown MoE router {router!r}")
        if not 0 < top_k <= n_experts:
            raise ValueError(f"top_k {top_k} must be in 1..{n_experts}")
        self.n_experts, self.top_k, self.expert_hidden = n_experts, top_k, expert_hidden
        self.router, self.norm_topk_prob, self.act = router, norm_topk_prob, act
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        # expert parallelism: this module holds experts [expert_offset, expert_offset + n_local)
        self.expert_offset, self.n_local = 0, n_experts
        self.impl = "auto"
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # a parameter, not a buffer, so that loaders (which fill parameters of a net built on
        # the meta device) fill it; never trained here
        self.expert_bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False) \
            if expert_bias else None
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * expert_hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, expert_hidden))
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)
        self.shared = SharedExpert(d_model, shared_hidden, act) if shared_hidden else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, d] -> topk_ids [T, k], topk_weights [T, k] (fp32). Router logits in fp32, as
        LLaDA2's gate computes them."""
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        if self.router == "softmax":
            return route_softmax_topk(logits, self.top_k, norm_topk_prob=self.norm_topk_prob,
                                      expert_bias=self.expert_bias)
        return route_sigmoid_group_topk(
            logits, self.top_k, expert_bias=self.expert_bias, n_group=self.n_group,
            topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d]
        ids, weights = self.route(flat)
        if self.impl == "reference":
            y = expert_ffn_reference(flat, ids, weights, self.w_gate_up, self.w_down, self.act,
                                     expert_offset=self.expert_offset)
        else:
            y = expert_ffn(flat, ids, weights, self.w_gate_up, self.w_down, self.act,
                           expert_offset=self.expert_offset, impl=self.impl)
        y = y.view(shape)
        if self.shared is not None:
            y = y + self.shared(x)
        return y
