"""The mixture-of-experts layer (model/moe.py): the fast expert path equals the per-expert loop on
awkward shapes, the routers are the published ones (written out here token by token), expert
parallelism sums to the whole layer, and the MoE module equals transformers' Qwen3-MoE and OLMoE
blocks on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.moe import (
    MoE,
    expert_ffn,
    expert_ffn_reference,
    grouped_mm_supported,
    route_sigmoid_group_topk,
    route_softmax_topk,
)

# (T, d, I, E, k): odd token counts, experts nobody picks (T*k < E), one token, k = E
SHAPES = [(37, 16, 8, 5, 2), (13, 12, 6, 7, 3), (1, 16, 8, 4, 4), (3, 8, 4, 16, 2),
          (64, 32, 16, 8, 1)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _operands(T, d, inter, E, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    w_gate_up = (torch.randn(E, 2 * inter, d, generator=g) / math.sqrt(d)).to(dtype)
    w_down = (torch.randn(E, d, inter, generator=g) / math.sqrt(inter)).to(dtype)
    ids, w = route_softmax_topk(torch.randn(T, E, generator=g), k, norm_topk_prob=True)
    return x, ids, w, w_gate_up, w_down


def _loop_by_token(x, ids, w, w_gate_up, w_down, act):
    """The definition, one token and one slot at a time (float64)."""
    inter = w_gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    f = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[act]
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            gu = w_gate_up[e].double() @ x[t].double()
            out[t] += float(w[t, s]) * (w_down[e].double() @ (f(gu[:inter]) * gu[inter:]))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_reference_is_the_definition(shape, act):
    x, ids, w, wgu, wd = _operands(*shape, torch.float32)
    ref = expert_ffn_reference(x, ids, w, wgu, wd, act)
    assert (ref.double() - _loop_by_token(x, ids, w, wgu, wd, act)).abs().max() < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "padded", "auto"])
def test_fast_path_equals_reference(shape, dtype, impl):
    x, ids, w, wgu, wd = _operands(*shape, dtype)
    if impl == "grouped" and not grouped_mm_supported(x, wgu):
        pytest.skip("grouped_mm needs 16-byte row strides")
    ref = expert_ffn_reference(x, ids, w, wgu, wd)
    fast = expert_ffn(x, ids, w, wgu, wd, impl=impl)
    err = (fast.float() - ref.float()).abs().max().item()
    print(f"{shape} {dtype} {impl}: max |fast - reference| = {err:.2e}")
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert err <= TOL[dtype] * max(1.0, ref.float().abs().max().item())


def test_grouped_path_runs_where_aligned():
    """d and I multiples of 16 bytes: the auto path is torch's grouped GEMM, no padding."""
    x, ids, w, wgu, wd = _operands(33, 32, 16, 8, 2, torch.float32)
    assert grouped_mm_supported(x, wgu)
    assert not grouped_mm_supported(x[:, :6].contiguous(), wgu[:, :, :6].contiguous())


@pytest.mark.parametrize("impl", ["grouped", "padded"])
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_parts_sum_to_the_layer(impl, world):
    """Each rank's experts [r*E/n, (r+1)*E/n) on global ids: the parts add up to the whole."""
    x, ids, w, wgu, wd = _operands(29, 16, 8, 8, 3, torch.float32, seed=3)
    whole = expert_ffn_reference(x, ids, w, wgu, wd)
    n = 8 // world
    parts = [expert_ffn(x, ids, w, wgu[r * n:(r + 1) * n], wd[r * n:(r + 1) * n],
                        expert_offset=r * n, impl=impl) for r in range(world)]
    ref_parts = [expert_ffn_reference(x, ids, w, wgu[r * n:(r + 1) * n], wd[r * n:(r + 1) * n],
                                      expert_offset=r * n) for r in range(world)]
    for p, rp in zip(parts, ref_parts, strict=True):
        assert (p - rp).abs().max() < 1e-5
    assert (sum(parts) - whole).abs().max() < 1e-5


def test_empty_batch():
    x, ids, w, wgu, wd = _operands(4, 16, 8, 4, 2, torch.float32)
    out = expert_ffn(x[:0], ids[:0], w[:0], wgu, wd)
    assert out.shape == (0, 16)


# --- routers, written out token by token from the authors' code --------------------------------
def test_softmax_router_with_expert_bias_is_llada_moe():
    """LLaDA-MoE: softmax, expert_bias added to the probabilities, the biased values are both
    what top-k ranks and the weights."""
    g = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(9, 6, generator=g), torch.randn(6, generator=g) * 0.3
    ids, w = route_softmax_topk(logits, 2, expert_bias=bias)
    for t in range(9):
        biased = torch.softmax(logits[t].double(), -1) + bias.double()
        order = sorted(range(6), key=lambda e: -float(biased[e]))[:2]
        assert ids[t].tolist() == order
        assert torch.allclose(w[t].double(), biased[order], atol=1e-6)


def test_softmax_router_norm_topk_is_qwen3_moe():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 8, generator=g)
    ids, w = route_softmax_topk(logits, 3, norm_topk_prob=True)
    p = torch.softmax(logits.double(), -1)
    top = p.topk(3, dim=-1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(w.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-6)


def test_group_limited_sigmoid_router_is_llada2():
    """LLaDA2 / BailingMoeV2 gate: groups rated by the sum of their two best biased scores, the
    topk_group best kept, top-k biased scores among them; weights the unbiased sigmoid scores,
    normalised, times routed_scaling_factor."""
    g = torch.Generator().manual_seed(3)
    E, n_group, topk_group, k, scale = 16, 4, 2, 4, 2.5
    logits, bias = torch.randn(11, E, generator=g), torch.randn(E, generator=g) * 0.5
    ids, w = route_sigmoid_group_topk(logits, k, expert_bias=bias, n_group=n_group,
                                      topk_group=topk_group, routed_scaling_factor=scale)
    per = E // n_group
    for t in range(11):
        s = torch.sigmoid(logits[t].double())
        c = s + bias.double()
        rating = [sorted(c[i * per:(i + 1) * per].tolist())[-2:] for i in range(n_group)]
        groups = sorted(range(n_group), key=lambda i: -sum(rating[i]))[:topk_group]
        allowed = [e for e in range(E) if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -float(c[e]))[:k]
        assert ids[t].tolist() == chosen
        want = s[chosen] / s[chosen].sum() * scale
        assert torch.allclose(w[t].double(), want, atol=1e-6)


# --- the module against transformers' blocks on the same weights -------------------------------
def test_moe_module_equals_transformers_qwen3_moe_block():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(0)
    hf = Qwen3MoeSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = MoE(32, 8, 2, 16, router="softmax", norm_topk_prob=True).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.w_gate_up.copy_(hf.experts.gate_up_proj)
        ours.w_down.copy_(hf.experts.down_proj)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        want = hf(x)
        want = want[0] if isinstance(want, tuple) else want
        for impl in ("auto", "padded", "reference"):
            ours.impl = impl
            assert (ours(x) - want).abs().max() < 1e-5, impl


def test_moe_module_equals_transformers_olmoe_block():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    hf_cfg = OlmoeConfig(hidden_size=24, intermediate_size=12, num_experts=6,
                         num_experts_per_tok=3, norm_topk_prob=False)
    torch.manual_seed(1)
    hf = OlmoeSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = MoE(24, 6, 3, 12, router="softmax", norm_topk_prob=False).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.w_gate_up.copy_(hf.experts.gate_up_proj)
        ours.w_down.copy_(hf.experts.down_proj)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        want = hf(x)
        want = want[0] if isinstance(want, tuple) else want
        assert (ours(x) - want).abs().max() < 1e-5


def test_shared_expert_adds_a_dense_mlp():
    torch.manual_seed(2)
    moe = MoE(16, 4, 2, 8, shared_hidden=12).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        routed = expert_ffn_reference(x, *moe.route(x), moe.w_gate_up, moe.w_down)
        sh = moe.shared
        dense = sh.w2(F.silu(sh.w1(x)) * sh.w3(x))
        assert (moe(x) - routed - dense).abs().max() < 1e-6


def test_bad_router_settings_are_refused():
    with pytest.raises(ValueError, match="router"):
        MoE(8, 4, 2, 8, router="tanh")
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 4, 5, 8)
    with pytest.raises(ValueError, match="groups"):
        route_sigmoid_group_topk(torch.randn(2, 6), 2, expert_bias=None, n_group=4, topk_group=2)
