"""LLaDA-MoE (`architectures: ["LLaDAMoEModelLM"]`, but `model_type: "llada"` as dense LLaDA):
OLMoE-style blocks, bidirectional, no logit shift.

LLaDA-MoE-7B-A1B: hidden 2048, 16 layers, 16 heads (head_dim = hidden / heads), 64 experts of
width 1024, top-8, q/k RMSNorm, vocab 157184 (the Ling tokenizer), mask 156895 (not in
config.json: model/loaders/special_ids.py).

Stored names (prefix model.):

    embed_tokens.weight                                 -> tok_embeddings.weight
    layers.{i}.input_layernorm.weight                   -> layers.{i}.attn_norm.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight          -> layers.{i}.attn.{wq,wk,wv,wo}.weight
    layers.{i}.self_attn.{q,k}_norm.weight              -> layers.{i}.attn.{q,k}_norm.weight
    layers.{i}.post_attention_layernorm.weight          -> layers.{i}.mlp_norm.weight
    layers.{i}.mlp.gate.weight                          -> layers.{i}.mlp.gate.weight (router)
    layers.{i}.mlp.expert_bias                          -> layers.{i}.mlp.expert_bias
    layers.{i}.mlp.experts.{j}.{gate,up,down}_proj      -> layers.{i}.mlp.w_gate_up / w_down [j]
    layers.{i}.mlp.{gate,up,down}_proj.weight           -> layers.{i}.mlp.{w1,w3,w2} (dense layers)
    layers.{i}.shared_expert.{gate,up,down}_proj.weight -> layers.{i}.mlp.shared.{w1,w3,w2}
    norm.weight, lm_head.weight                         -> norm.weight, lm_head.weight

As its authors' code computes it (not as OLMoE or the config suggests): q/k norm over each head
(head_dim wide, not the whole projection as in OLMoE), applied before the rotary; the router is
a softmax whose probabilities get `expert_bias` added (when moe_router_enable_expert_bias) and
the biased values are both the choice and the weights; norm_topk_prob is forced False; the
shared expert sits outside `mlp` and adds to its output. A layer is dense where
moe_layer_freq[i] == 0 (only a dense prefix is reproduced).
"""

from __future__ import annotations

from model.config import ModelConfig
from model.loaders.common import (
    Format,
    NameMap,
    Target,
    first,
    require,
    rope_theta,
    special_id,
    strip_prefix,
    token_id,
)
from model.loaders.experts import expert_targets
from model.loaders.llama import LLAMA_TOP, llama_layer_names, swiglu_names
from model.loaders.special_ids import architecture_id

ARCHITECTURE = "LLaDAMoEModelLM"
PREFIXES = ("model.",)

_names = NameMap(
    prefixes=PREFIXES,
    top=LLAMA_TOP,
    layer={**llama_layer_names(qk_norm=True, o_bias=True),
           "mlp.gate.weight": "mlp.gate.weight", "mlp.expert_bias": "mlp.expert_bias",
           **swiglu_names("shared_expert", "mlp.shared")},
    dropped_in_layer=("self_attn.rotary_emb.inv_freq",),
)


def map_tensor(key: str, cfg: ModelConfig) -> list[Target] | None:
    if key.endswith(".bias") and ".self_attn." in key and not cfg.qkv_bias:
        return None
    experts = expert_targets(strip_prefix(key, PREFIXES), cfg)
    return experts if experts is not None else _names(key, cfg)


def _dense_prefix(freq: list, n_layers: int) -> int:
    """moe_layer_freq [0, 0, 1, 1, ...] -> 2 dense layers first; other patterns are refused."""
    if not freq:
        return 0
    require(len(freq) == n_layers, f"moe_layer_freq has {len(freq)} entries for {n_layers} layers")
    k = next((i for i, f in enumerate(freq) if f), n_layers)
    require(all(freq[k:]), f"moe_layer_freq {freq}: only dense layers first, then MoE, is supported")
    return k


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    require(hf.get("hidden_act", "silu") == "silu",
            f"hidden_act {hf.get('hidden_act')!r}: only SiLU experts are supported")
    require(hf.get("clip_qkv") is None, "clip_qkv is not supported")
    score = hf.get("moe_router_score_function") or "softmax"
    require(score == "softmax", f"moe_router_score_function {score!r}: LLaDA-MoE's code "
                                "routes with a softmax")
    shape = lambda n: _names.shape(shapes, n)  # noqa: E731
    emb = shape("embed_tokens.weight")
    require(emb is not None, "no model.embed_tokens.weight in the checkpoint")
    d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    n_layers = int(hf["num_hidden_layers"])
    if float(hf.get("partial_rotary_factor") or -1) <= 0:
        # the config class's placeholder -1 means "not set": the whole head rotates (and
        # checkpoint_rope, which reads the same dict afterwards, must not see -1)
        hf["partial_rotary_factor"] = 1.0
    shared = hf.get("shared_expert_intermediate_size")
    mask = first(hf.get("mask_token_id"), special_id(raw_tok, "mask"),
                 architecture_id(hf, "mask"))
    eos = first(hf.get("eos_token_id"), architecture_id(hf, "eos"), special_id(raw_tok, "eos"))
    require(mask is not None and eos is not None, "LLaDA-MoE: no mask or eos id")
    eot = token_id(raw_tok, "<|role_end|>")
    return ModelConfig(
        name="llada-moe",
        vocab_size=emb[0], d_model=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        mlp_hidden=int(hf.get("dense_intermediate_size") or 0),
        rope_theta=rope_theta(hf, 10000.0), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        mask_id=mask, eos_id=eos, pad_id=first(hf.get("pad_token_id"), eos),
        eot_id=eot if eot not in (None, mask) else None,
        attention="full", block_length=32, default_steps_per_block=32,
        time_conditioning=False, logit_shift=False,
        qkv_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or shape("lm_head.weight") is None,
        qk_norm=bool(hf.get("qk_layernorm", shape("layers.0.self_attn.q_norm.weight") is not None)),
        n_experts=int(hf["num_experts"]), experts_per_token=int(hf["num_experts_per_tok"]),
        moe_hidden=int(hf["expert_intermediate_size"]),
        shared_expert_hidden=int(shared) if shared and shared > 0 else 0,
        first_k_dense=_dense_prefix(list(hf.get("moe_layer_freq") or []), n_layers),
        moe_router="softmax", moe_norm_topk=False,
        moe_expert_bias=bool(hf.get("moe_router_enable_expert_bias", False)),
        arch="llama",
        extra={"family": "llada_moe", "model_type": hf.get("model_type"),
               "architecture": ARCHITECTURE},
    )


FORMAT = Format(family="llada_moe", model_types=(), tokenizer_fallback=None,
                build_config=build_config, map_tensor=map_tensor, architectures=(ARCHITECTURE,))
