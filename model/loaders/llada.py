"""LLaDA (`model_type: "llada"`): an OLMo-style Llama block with the causal mask removed.

LLaDA-8B: d_model 4096, n_layers 32, n_heads = n_kv_heads = 32, mlp_hidden_size 12288,
vocab 126464, rope_theta 500000, rms_norm_eps 1e-5, no biases, untied LM head; mask_token_id
126336 (<|mdm_mask|>), eos 126081 (<|endoftext|>), end of turn 126348 (<|eot_id|>). No logit shift.

Stored names (prefix model.transformer.):

    wte.weight                                  -> tok_embeddings.weight
    blocks.{i}.attn_norm.weight                 -> layers.{i}.attn_norm.weight
    blocks.{i}.{q,k,v}_proj.weight              -> layers.{i}.attn.{wq,wk,wv}.weight
    blocks.{i}.attn_out.weight                  -> layers.{i}.attn.wo.weight
    blocks.{i}.ff_norm.weight                   -> layers.{i}.mlp_norm.weight
    blocks.{i}.ff_proj.weight  (gate, SiLU)     -> layers.{i}.mlp.w1.weight
    blocks.{i}.up_proj.weight                   -> layers.{i}.mlp.w3.weight
    blocks.{i}.ff_out.weight   (down)           -> layers.{i}.mlp.w2.weight
    ln_f.weight                                 -> norm.weight
    ff_out.weight              (LM head)        -> lm_head.weight  (absent when weight_tying)

The block: x += attn_out(attn(rotary(q,k), v)) on attn_norm(x); x += ff_out(silu(ff_proj(h)) *
up_proj(h)) on h = ff_norm(x); NeoX rotary over positions 0..T-1. OLMo options LLaDA does not use
(ALiBi, QK layer norm, qkv clipping, biases, non-RMS norms, other block types) are refused
rather than silently mis-loaded.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.loaders.common import Format, NameMap, first, require, special_id, token_id

map_tensor = NameMap(
    prefixes=("model.transformer.", "transformer."),
    top={"wte.weight": "tok_embeddings.weight", "ln_f.weight": "norm.weight",
         "ff_out.weight": "lm_head.weight"},
    layer={
        "attn_norm.weight": "attn_norm.weight", "attn_out.weight": "attn.wo.weight",
        **{f"{p}_proj.{kind}": f"attn.w{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")},
        "ff_norm.weight": "mlp_norm.weight", "ff_proj.weight": "mlp.w1.weight",  # gate (SiLU)
        "up_proj.weight": "mlp.w3.weight", "ff_out.weight": "mlp.w2.weight",  # up, down
    },
    bias_needs_qkv_bias=True,  # include_qkv_bias
)


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    # Refuse the OLMo variants whose maths our block does not reproduce.
    require(hf.get("block_type", "llama") == "llama",
            f"block_type {hf.get('block_type')!r}: only LLaDA's 'llama' block is supported")
    require(not hf.get("alibi", False), "ALiBi attention is not supported")
    require(hf.get("rope", True), "LLaDA without rotary embeddings is not supported")
    require(not hf.get("attention_layer_norm", False), "QK layer norm is not supported")
    require(hf.get("clip_qkv") is None, "clip_qkv is not supported")
    require(not hf.get("include_bias", False), "include_bias=true is not supported")
    require(hf.get("layer_norm_type", "rms") == "rms",
            f"layer_norm_type {hf.get('layer_norm_type')!r}: only RMSNorm is supported")
    require(hf.get("layer_norm_with_affine", True) and not hf.get("bias_for_layer_norm", False),
            "LLaDA norms must have a weight and no bias")
    require(hf.get("activation_type", "silu") in ("silu", "swiglu"),
            f"activation_type {hf.get('activation_type')!r}: only SiLU gating is supported")
    require(not hf.get("scale_logits", False), "scale_logits is not supported")
    require(not hf.get("input_emb_norm", False), "input_emb_norm is not supported")

    def shape(name):
        return map_tensor.shape(shapes, name)

    emb = shape("wte.weight")
    require(emb is not None, "no model.transformer.wte.weight in the checkpoint")
    gate = shape("blocks.0.ff_proj.weight")
    n_heads = int(hf["n_heads"])
    n_kv = 1 if hf.get("multi_query_attention") else int(hf.get("n_kv_heads") or n_heads)
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(eos is not None, "no eos_token_id in config.json or the tokenizer")
    mask = first(hf.get("mask_token_id"), token_id(raw_tok, "<|mdm_mask|>"),
                 special_id(raw_tok, "mask"))
    require(mask is not None, "LLaDA checkpoint without mask_token_id")
    return ModelConfig(
        name="llada",
        vocab_size=emb[0],  # embedding_size (may pad vocab_size)
        d_model=int(hf["d_model"]),
        n_layers=int(hf["n_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        mlp_hidden=gate[0] if gate else int(hf["mlp_hidden_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(hf.get("max_sequence_length", 4096)),
        mask_id=mask, eos_id=eos, pad_id=first(hf.get("pad_token_id"), eos),
        eot_id=token_id(raw_tok, "<|eot_id|>"),
        attention="full", block_length=32, default_steps_per_block=32,
        time_conditioning=False, logit_shift=False,
        qkv_bias=bool(hf.get("include_qkv_bias", False)),
        tie_embeddings=bool(hf.get("weight_tying", False)) or shape("ff_out.weight") is None,
        arch="llama",
        extra={"family": "llada", "model_type": "llada"},
    )


FORMAT = Format(family="llada", model_types=("llada",), tokenizer_fallback=None,
                build_config=build_config, map_tensor=map_tensor)
