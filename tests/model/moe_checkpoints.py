"""Tiny random checkpoints of the MoE / block-aligned families in their published formats, and
reference forwards written from the authors' modeling code (float64, sharing no code with
model/ or the loaders).

    W, c, ids = make_llada2(d)          # config.json, safetensors, tokenizer under d
    logits = ref_llada2(W, c, x, allowed)   # allowed: bool [T, T] attention mask (None = full)

Formats: LLaDA2MoeModelLM (fused query_key_value, per-head q/k norm, partial rotary, sigmoid
group-limited router with expert bias, shared expert, dense first layer, MTP layer),
LLaDAMoEModelLM (model_type "llada"; OLMoE-style experts, shared_expert outside mlp, softmax +
expert bias router), SDAR (Qwen3) and SDAR-MoE (Qwen3-MoE, per-expert tensors).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.model.test_loaders import (
    heads,
    merge,
    norm_weight,
    randn,
    ref_attention,
    ref_rmsnorm,
    write_checkpoint,
    write_tokenizer_json,
)

LING_SPECIALS = ["<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<|mask|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
CHAT = ("{% for m in messages %}<role>{{ m['role'] }}</role>{{ m['content'] }}<|role_end|>"
        "{% endfor %}{% if add_generation_prompt %}<role>assistant</role>{% endif %}")


# --- reference maths ----------------------------------------------------------------------------
def ref_rope(x, theta, rot):
    """NeoX rotary on the first `rot` dims of each head, positions 0..T-1 (HF partial rotary:
    inv_freq over rot dims), the rest passed through. x: [B, H, T, hd]."""
    T = x.shape[2]
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., :rot // 2], xr[..., rot // 2:]
    return torch.cat([xr * cos + torch.cat([-x2, x1], -1) * sin, xp], -1)


def ref_swiglu(h, gate, up, down):
    return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T


def ref_swiglu_at(W, prefix: str, h):
    """ref_swiglu with the {gate,up,down}_proj weights stored under `prefix`."""
    return ref_swiglu(h, W[prefix + "gate_proj.weight"], W[prefix + "up_proj.weight"],
                      W[prefix + "down_proj.weight"])


def ref_expert_fn(W, experts: str):
    """expert(e, t) for ref_experts: the SwiGLU stored under f"{experts}{e}."."""
    return lambda e, t: ref_swiglu_at(W, f"{experts}{e}.", t)


def ref_qwen3_attention(W, p: str, h, H: int, Hkv: int, hd: int, theta: float, eps: float,
                        allowed=None):
    """Qwen3-style attention of the layer under prefix p: per-head RMSNorm of q and k before
    the (full) NeoX rotary, then o_proj. h: the normed input [B, T, D]."""
    q = ref_rmsnorm(heads(h @ W[p + "self_attn.q_proj.weight"].T, H),
                    W[p + "self_attn.q_norm.weight"], eps)
    k = ref_rmsnorm(heads(h @ W[p + "self_attn.k_proj.weight"].T, Hkv),
                    W[p + "self_attn.k_norm.weight"], eps)
    v = heads(h @ W[p + "self_attn.v_proj.weight"].T, Hkv)
    q, k = ref_rope(q, theta, hd), ref_rope(k, theta, hd)
    return merge(ref_attention(q, k, v, allowed)) @ W[p + "self_attn.o_proj.weight"].T


def swiglu_weights(g, prefix: str, hidden: int, d: int, std: float = 0.2) -> dict:
    """Random {gate,up,down}_proj weights under `prefix` (drawn in that order)."""
    return {prefix + "gate_proj.weight": randn(g, hidden, d, std=std),
            prefix + "up_proj.weight": randn(g, hidden, d, std=std),
            prefix + "down_proj.weight": randn(g, d, hidden, std=std)}


def ref_llada2_gate(h, w, bias, k, n_group, topk_group, scale):
    """LLaDA2MoeGate for one token h [d] -> [(expert, weight)]."""
    s = torch.sigmoid(w @ h)
    c = s + bias
    E = s.shape[0]
    per = E // n_group
    rating = [sum(sorted(c[i * per:(i + 1) * per].tolist())[-2:]) for i in range(n_group)]
    groups = sorted(range(n_group), key=lambda i: -rating[i])[:topk_group]
    chosen = sorted((e for e in range(E) if e // per in groups), key=lambda e: -float(c[e]))[:k]
    ws = s[chosen]
    ws = ws / (ws.sum() + 1e-20) if k > 1 else ws
    return list(zip(chosen, (ws * scale).tolist(), strict=True))


def ref_softmax_gate(h, w, bias, k, norm):
    """Qwen3-MoE / LLaDA-MoE router for one token: softmax (+ expert_bias on the probabilities,
    LLaDA-MoE), top-k of those values, renormalised when norm."""
    p = torch.softmax(w @ h, -1)
    if bias is not None:
        p = p + bias
    vals, idx = p.topk(k)
    if norm:
        vals = vals / vals.sum()
    return list(zip(idx.tolist(), vals.tolist(), strict=True))


def ref_experts(x, route, expert):
    """x [B, T, d]; route(h) -> [(e, w)]; expert(e, h) -> [d]: the routed sum per token."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for e, w in route(x[b, t]):
                out[b, t] += w * expert(e, x[b, t])
    return out


# --- LLaDA2 -------------------------------------------------------------------------------------
def llada2_config(vocab: int, **over) -> dict:
    c = dict(architectures=["LLaDA2MoeModelLM"], model_type="llada2_moe", vocab_size=vocab,
             hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, hidden_act="silu", use_qkv_bias=False,
             use_qk_norm=True, use_bias=False, rms_norm_eps=1e-6, tie_word_embeddings=False,
             max_position_embeddings=256, rope_theta=600000.0, partial_rotary_factor=0.5,
             num_experts=8, num_shared_experts=1, num_experts_per_tok=2, n_group=4,
             topk_group=2, routed_scaling_factor=2.5, moe_intermediate_size=16,
             first_k_dense_replace=1, score_function="sigmoid", norm_topk_prob=True,
             rotary_dim=8, num_nextn_predict_layers=1)
    c.update(over)
    return c


def make_llada2(d: Path, seed: int = 10, shards: int = 1, **over):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, LING_SPECIALS, {"eos_token": "<|endoftext|>",
                                                  "chat_template": CHAT,
                                                  "tokenizer_class": "PreTrainedTokenizerFast"})
    vocab = max(ids.values()) + 3
    c = llada2_config(vocab, mask_token_id=ids["<|mask|>"], eos_token_id=ids["<|endoftext|>"],
                      pad_token_id=ids["<|endoftext|>"], **over)
    g = torch.Generator().manual_seed(seed)
    D, H, Hkv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, inter, M = c["num_experts"], c["moe_intermediate_size"], c["intermediate_size"]
    W = {"model.word_embeddings.weight": randn(g, vocab, D, std=0.5),
         "model.norm.weight": norm_weight(g, D), "lm_head.weight": randn(g, vocab, D)}
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):  # + the MTP layer
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = norm_weight(g, D)
        W[p + "post_attention_layernorm.weight"] = norm_weight(g, D)
        W[p + "attention.query_key_value.weight"] = randn(g, (H + 2 * Hkv) * hd, D)
        W[p + "attention.query_layernorm.weight"] = norm_weight(g, hd)
        W[p + "attention.key_layernorm.weight"] = norm_weight(g, hd)
        W[p + "attention.dense.weight"] = randn(g, D, H * hd)
        if i < c["first_k_dense_replace"]:
            W.update(swiglu_weights(g, p + "mlp.", M, D))
            continue
        W[p + "mlp.gate.weight"] = randn(g, E, D, std=0.5)
        W[p + "mlp.gate.expert_bias"] = randn(g, E, std=0.3)
        for j in range(E):
            W.update(swiglu_weights(g, p + f"mlp.experts.{j}.", inter, D, std=0.3))
        W.update(swiglu_weights(g, p + "mlp.shared_experts.", inter * c["num_shared_experts"], D))
    write_checkpoint(d, c, W, shards=shards)
    return W, c, ids


def ref_llada2(W, c, ids, allowed=None):
    """LLaDA2MoeModelLM.forward (BailingMoeV2): fused qkv, per-head q/k RMSNorm, partial NeoX
    rotary, dense first layers, sigmoid group-limited MoE + shared expert, no shift."""
    W = {k: v.double() for k, v in W.items()}
    H, Hkv, hd, eps = (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                       c["rms_norm_eps"])
    rot = int(hd * c["partial_rotary_factor"])
    x = W["model.word_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        qkv = h @ W[p + "attention.query_key_value.weight"].T
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], -1)
        q = ref_rmsnorm(heads(q, H), W[p + "attention.query_layernorm.weight"], eps)
        k = ref_rmsnorm(heads(k, Hkv), W[p + "attention.key_layernorm.weight"], eps)
        q, k = ref_rope(q, c["rope_theta"], rot), ref_rope(k, c["rope_theta"], rot)
        a = ref_attention(q, k, heads(v, Hkv), allowed)
        x = x + merge(a) @ W[p + "attention.dense.weight"].T
        h = ref_rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        if i < c["first_k_dense_replace"]:
            x = x + ref_swiglu_at(W, p + "mlp.", h)
            continue

        def route(t, p=p):
            return ref_llada2_gate(t, W[p + "mlp.gate.weight"], W[p + "mlp.gate.expert_bias"],
                                   c["num_experts_per_tok"], c["n_group"], c["topk_group"],
                                   c["routed_scaling_factor"])

        x = x + ref_experts(h, route, ref_expert_fn(W, p + "mlp.experts.")) + \
            ref_swiglu_at(W, p + "mlp.shared_experts.", h)
    x = ref_rmsnorm(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T


# --- LLaDA-MoE ----------------------------------------------------------------------------------
def make_llada_moe(d: Path, seed: int = 11, vocab: int | None = None, mask_in_config=True):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, LING_SPECIALS, {"eos_token": "<|endoftext|>",
                                                  "tokenizer_class": "PreTrainedTokenizerFast"})
    vocab = vocab or max(ids.values()) + 3
    c = dict(architectures=["LLaDAMoEModelLM"], model_type="llada", vocab_size=vocab,
             hidden_size=24, dense_intermediate_size=40, expert_intermediate_size=12,
             shared_expert_intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, hidden_act="silu", max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=50000.0, partial_rotary_factor=1.0,
             attention_bias=False, clip_qkv=None, num_experts=6, num_experts_per_tok=2,
             norm_topk_prob=True, qk_layernorm=True, moe_layer_freq=[0, 1, 1],
             moe_router_enable_expert_bias=True, moe_router_score_function="softmax",
             eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
             tie_word_embeddings=False)
    if mask_in_config:
        c["mask_token_id"] = ids["<|mask|>"]
    g = torch.Generator().manual_seed(seed)
    D, H = c["hidden_size"], c["num_attention_heads"]
    hd, E, inter, S, M = D // H, c["num_experts"], 12, 20, 40
    W = {"model.embed_tokens.weight": randn(g, vocab, D, std=0.5),
         "model.norm.weight": norm_weight(g, D), "lm_head.weight": randn(g, vocab, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = norm_weight(g, D)
        W[p + "post_attention_layernorm.weight"] = norm_weight(g, D)
        for n in "qkvo":
            W[p + f"self_attn.{n}_proj.weight"] = randn(g, D, D)
        W[p + "self_attn.q_norm.weight"] = norm_weight(g, hd)
        W[p + "self_attn.k_norm.weight"] = norm_weight(g, hd)
        if c["moe_layer_freq"][i] == 0:
            W.update(swiglu_weights(g, p + "mlp.", M, D))
            continue
        W[p + "mlp.gate.weight"] = randn(g, E, D, std=0.5)
        W[p + "mlp.expert_bias"] = randn(g, E, std=0.1)
        for j in range(E):
            W.update(swiglu_weights(g, p + f"mlp.experts.{j}.", inter, D, std=0.3))
        W.update(swiglu_weights(g, p + "shared_expert.", S, D))
    write_checkpoint(d, c, W)
    return W, c, ids


def ref_llada_moe(W, c, ids):
    """LLaDAMoEModelLM: per-head q/k norm before the rotary, bidirectional, softmax + bias
    router (norm_topk_prob forced False), shared expert outside mlp, no shift."""
    W = {k: v.double() for k, v in W.items()}
    H, eps = c["num_attention_heads"], c["rms_norm_eps"]
    hd = c["hidden_size"] // H
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        x = x + ref_qwen3_attention(W, p, h, H, H, hd, c["rope_theta"], eps)
        h = ref_rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        if c["moe_layer_freq"][i] == 0:
            x = x + ref_swiglu_at(W, p + "mlp.", h)
            continue

        def route(t, p=p):
            return ref_softmax_gate(t, W[p + "mlp.gate.weight"], W[p + "mlp.expert_bias"],
                                    c["num_experts_per_tok"], norm=False)

        x = x + ref_experts(h, route, ref_expert_fn(W, p + "mlp.experts.")) + \
            ref_swiglu_at(W, p + "shared_expert.", h)
    return ref_rmsnorm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


# --- SDAR / SDAR-MoE ----------------------------------------------------------------------------
def make_sdar(d: Path, seed: int = 12, moe: bool = False, block_size: int = 4, shards: int = 1):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, QWEN_SPECIALS, {"eos_token": "<|im_end|>",
                                                  "mask_token": "<|MASK|>",
                                                  "tokenizer_class": "Qwen2Tokenizer"})
    vocab = max(ids.values()) + 5
    c = dict(architectures=["SDARMoeForCausalLM" if moe else "SDARForCausalLM"],
             model_type="sdar_moe" if moe else "sdar", vocab_size=vocab, hidden_size=40,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16,  # 4 x 16 != 40: an explicit head_dim
             hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6,
             rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=False,
             block_size=block_size, eos_token_id=ids["<|im_end|>"],
             pad_token_id=ids["<|endoftext|>"])
    if moe:
        c.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    g = torch.Generator().manual_seed(seed)
    D, H, Hkv, hd = 40, 4, 2, 16
    W = {"model.embed_tokens.weight": randn(g, vocab, D, std=0.5),
         "model.norm.weight": norm_weight(g, D), "lm_head.weight": randn(g, vocab, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = norm_weight(g, D)
        W[p + "post_attention_layernorm.weight"] = norm_weight(g, D)
        W[p + "self_attn.q_proj.weight"] = randn(g, H * hd, D)
        W[p + "self_attn.k_proj.weight"] = randn(g, Hkv * hd, D)
        W[p + "self_attn.v_proj.weight"] = randn(g, Hkv * hd, D)
        W[p + "self_attn.o_proj.weight"] = randn(g, D, H * hd)
        W[p + "self_attn.q_norm.weight"] = norm_weight(g, hd)
        W[p + "self_attn.k_norm.weight"] = norm_weight(g, hd)
        if not moe:
            W.update(swiglu_weights(g, p + "mlp.", 48, D))
            continue
        W[p + "mlp.gate.weight"] = randn(g, 8, D, std=0.5)
        for j in range(8):
            W.update(swiglu_weights(g, p + f"mlp.experts.{j}.", 16, D, std=0.3))
    write_checkpoint(d, c, W, shards=shards)
    return W, c, ids


def ref_sdar(W, c, ids, allowed=None):
    """Qwen3 / Qwen3-MoE decoder layers (SDAR), any attention mask, no shift."""
    W = {k: v.double() for k, v in W.items()}
    H, Hkv, hd, eps = (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                       c["rms_norm_eps"])
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        x = x + ref_qwen3_attention(W, p, h, H, Hkv, hd, c["rope_theta"], eps, allowed)
        h = ref_rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        if "num_experts" not in c:
            x = x + ref_swiglu_at(W, p + "mlp.", h)
            continue

        def route(t, p=p):
            return ref_softmax_gate(t, W[p + "mlp.gate.weight"], None, c["num_experts_per_tok"],
                                    norm=c["norm_topk_prob"])

        x = x + ref_experts(h, route, ref_expert_fn(W, p + "mlp.experts."))
    return ref_rmsnorm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


def aligned_block_causal(T: int, block: int) -> torch.Tensor:
    """The authors' inference mask: blocks of `block` from position 0, a query sees its block
    and the earlier ones. bool [T, T]."""
    blk = torch.arange(T) // block
    return blk[:, None] >= blk[None, :]


def additive(mask: torch.Tensor) -> torch.Tensor:
    """bool [T, T] -> float [1, 1, T, T] (0 / -inf), what transformers takes as a 4-D mask."""
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, -math.inf)[None, None]
