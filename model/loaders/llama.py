"""DiffuLLaMA (`model_type: "llama"`): LLaMA-2 weights and names, attention made bidirectional,
logits shifted (hidden state i-1 predicts token i).

Stored names (transformers LlamaForCausalLM; DiffuLLaMA's own DiscreteDiffusionModel wrapper
saves the same modules under `denoise_model.` / `embed_tokens`):

    model.embed_tokens.weight                          -> tok_embeddings.weight
    model.layers.{i}.input_layernorm.weight            -> layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight     -> layers.{i}.attn.{wq,wk,wv}.weight
    model.layers.{i}.self_attn.o_proj.weight           -> layers.{i}.attn.wo.weight
    model.layers.{i}.post_attention_layernorm.weight   -> layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    -> layers.{i}.mlp.{w1,w3,w2}.weight
    model.norm.weight                                  -> norm.weight
    lm_head.weight                                     -> lm_head.weight

RMSNorm, NeoX rotary (rotate_half) and SwiGLU are exactly our "llama" block. The mask token:
DiffuLLaMA's tokenizer has none; its code falls back to id 811 (LLaMA-Factory loader.py,
"for diffu-llama"), which we use unless the tokenizer or config.json names one.
The same name map serves Dream (Qwen2 names, dream.py), which adds q/k/v biases.
"""

from __future__ import annotations

import logging

from model.config import ModelConfig
from model.loaders.common import Format, NameMap, first, require, rope_theta, special_id

log = logging.getLogger(__name__)

DIFFULLAMA_MASK_ID = 811  # LLaMA-Factory/src/llamafactory/model/loader.py

# Llama / Qwen2 / Qwen3 tensor names (transformers) -> ours, shared by every format stored in
# them (Dream, Fast-dLLM v2, SDAR, LLaDA-MoE; LLaDA2's norms and MLP).
LLAMA_TOP = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_NORMS = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "mlp_norm.weight"}


def swiglu_names(stored: str = "mlp", ours: str = "mlp") -> dict[str, str]:
    """{stored}.{gate,up,down}_proj.weight -> {ours}.{w1,w3,w2}.weight (a dense MLP, or a
    MoE's shared experts: swiglu_names("mlp.shared_experts", "mlp.shared"))."""
    return {f"{stored}.{p}_proj.weight": f"{ours}.{w}.weight"
            for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}


def llama_layer_names(*, qk_norm: bool = False, o_bias: bool = False) -> dict[str, str]:
    """Names under "layers.{i}.": norms, q/k/v (weights and biases; NameMap's
    bias_needs_qkv_bias drops the biases a config does not have), o, the SwiGLU MLP; qk_norm:
    Qwen3's per-head q_norm / k_norm; o_bias: an o_proj bias too (LLaDA-MoE)."""
    names = {**LLAMA_NORMS, **swiglu_names(),
             **{f"self_attn.{p}_proj.{kind}": f"attn.w{p}.{kind}"
                for p in "qkv" for kind in ("weight", "bias")},
             "self_attn.o_proj.weight": "attn.wo.weight"}
    if o_bias:
        names["self_attn.o_proj.bias"] = "attn.wo.bias"
    if qk_norm:
        names.update({"self_attn.q_norm.weight": "attn.q_norm.weight",
                      "self_attn.k_norm.weight": "attn.k_norm.weight"})
    return names


map_hf_llama = NameMap(
    prefixes=("model.", "denoise_model."),
    top=LLAMA_TOP,
    layer=llama_layer_names(),
    dropped_in_layer=("self_attn.rotary_emb.inv_freq",),
    bias_needs_qkv_bias=True,  # Qwen2 (Dream) has q/k/v biases, LLaMA-2 none
)


def llama_like_config(hf: dict, shapes: dict, *, name: str, family: str, theta_default: float,
                      **fields) -> ModelConfig:
    """Shapes and norms of a transformers Llama/Qwen2 config.json; `fields` adds the ids and
    diffusion settings (attention, shift) of the family."""
    require(hf.get("hidden_act", "silu") == "silu",
            f"hidden_act {hf.get('hidden_act')!r}: only SiLU (SwiGLU) is supported")
    require(not hf.get("mlp_bias", False), "mlp_bias=true is not supported")
    d = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    require(head_dim in (None, d // n_heads),
            f"head_dim {head_dim} != hidden_size / num_attention_heads ({d // n_heads})")
    emb = map_hf_llama.shape(shapes, "embed_tokens.weight")
    gate = map_hf_llama.shape(shapes, "layers.0.mlp.gate_proj.weight")
    lm_head = map_hf_llama.shape(shapes, "lm_head.weight")
    return ModelConfig(
        name=name,
        vocab_size=emb[0],  # the stored embedding, which may be larger than config.vocab_size
        d_model=d,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        mlp_hidden=gate[0] if gate else int(hf["intermediate_size"]),
        rope_theta=rope_theta(hf, theta_default),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # A tied checkpoint stores no lm_head at all.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or lm_head is None,
        time_conditioning=False,
        arch="llama",
        extra={"family": family, "model_type": hf.get("model_type")},
        **fields,
    )


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    require(not hf.get("attention_bias", False),
            "attention_bias=true (biases on q/k/v/o) is not a LLaMA-2 / DiffuLLaMA layout")
    mask = first(special_id(raw_tok, "mask"), hf.get("mask_token_id"))
    if mask is None:
        mask = DIFFULLAMA_MASK_ID
        log.warning("no mask token in tokenizer or config.json; using DiffuLLaMA's id %d", mask)
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(eos is not None, "no eos_token_id in config.json or the tokenizer")
    pad = first(hf.get("pad_token_id"), special_id(raw_tok, "pad"), eos)
    return llama_like_config(
        hf, shapes, name="diffullama", family="diffullama",
        theta_default=10000.0,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        mask_id=mask, eos_id=eos, pad_id=pad,
        eot_id=None, attention="full", block_length=32, default_steps_per_block=32,
        logit_shift=True, qkv_bias=False,
    )


FORMAT = Format(family="diffullama", model_types=("llama",), tokenizer_fallback="llama",
                build_config=build_config, map_tensor=map_hf_llama)
