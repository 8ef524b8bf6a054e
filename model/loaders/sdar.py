"""SDAR (`model_type: "sdar"` / `"sdar_moe"`, `SDARForCausalLM` / `SDARMoeForCausalLM`, JetAstra):
Qwen3 and Qwen3-MoE layers trained for block diffusion, blocks aligned to position 0.

SDAR-1.7B/4B/8B-Chat are Qwen3 shapes (q/k RMSNorm per head, explicit head_dim: 4B has hidden
2560 with 32 heads of 128), SDAR-30B-A3B is Qwen3-30B-A3B (128 experts of width 768, top-8,
norm_topk_prob). Block size: config.json `block_size` (4 by default; variants 8-64). Mask
<|MASK|> 151669 (tokenizer_config.json; `<MASK>` in added_tokens.json), not in config.json.
No logit shift. The authors' generate (JetAstra/SDAR generate.py) aligns blocks to position 0:
the prompt is prefilled block-causally up to its last whole block, its tail is denoised with the
first generated block, and the canvas runs to a block boundary (cfg.block_align "zero").

Stored names are transformers' Qwen3 / Qwen3-MoE names (prefix model.):

    embed_tokens.weight                               -> tok_embeddings.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias} -> layers.{i}.attn.{wq,wk,wv,wo}.*
    layers.{i}.self_attn.{q,k}_norm.weight            -> layers.{i}.attn.{q,k}_norm.weight
    layers.{i}.input_layernorm / post_attention_layernorm -> attn_norm / mlp_norm
    layers.{i}.mlp.{gate,up,down}_proj.weight         -> layers.{i}.mlp.{w1,w3,w2} (dense)
    layers.{i}.mlp.gate.weight                        -> layers.{i}.mlp.gate.weight (MoE router)
    layers.{i}.mlp.experts.{j}.{gate,up,down}_proj    -> layers.{i}.mlp.w_gate_up / w_down [j]
    norm.weight, lm_head.weight                       -> norm.weight, lm_head.weight

No HF modeling file of SDAR-MoE is published; its layers follow Qwen3-MoE as SGLang's and
LMDeploy's implementations do: softmax router, top-k, renormalised when norm_topk_prob, no
shared expert; layers listed in mlp_only_layers stay dense (only a dense prefix is reproduced).
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
from model.loaders.llama import LLAMA_TOP, llama_layer_names
from model.loaders.special_ids import architecture_id

PREFIXES = ("model.",)

_names = NameMap(
    prefixes=PREFIXES,
    top=LLAMA_TOP,
    layer={**llama_layer_names(qk_norm=True), "mlp.gate.weight": "mlp.gate.weight"},
    dropped_in_layer=("self_attn.rotary_emb.inv_freq",),
    bias_needs_qkv_bias=True,
)


def map_tensor(key: str, cfg: ModelConfig) -> list[Target] | None:
    experts = expert_targets(strip_prefix(key, PREFIXES), cfg) if cfg.n_experts else None
    return experts if experts is not None else _names(key, cfg)


def _dense_prefix(mlp_only: list, n_layers: int) -> int:
    k = len(mlp_only)
    require(sorted(mlp_only) == list(range(k)),
            f"mlp_only_layers {mlp_only}: only a dense prefix of layers is supported")
    return min(k, n_layers)


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    moe = hf.get("model_type") == "sdar_moe" or bool(hf.get("num_experts"))
    require(hf.get("hidden_act", "silu") == "silu",
            f"hidden_act {hf.get('hidden_act')!r}: only SiLU is supported")
    require(not hf.get("use_sliding_window", False), "sliding-window attention is not supported")
    shape = lambda n: _names.shape(shapes, n)  # noqa: E731
    emb = shape("embed_tokens.weight")
    require(emb is not None, "no model.embed_tokens.weight in the checkpoint")
    d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d // n_heads)
    n_layers = int(hf["num_hidden_layers"])
    fields = {}
    if moe:
        require(int(hf.get("decoder_sparse_step") or 1) == 1,
                "decoder_sparse_step != 1 (MoE every other layer) is not supported")
        fields = dict(n_experts=int(hf["num_experts"]),
                      experts_per_token=int(hf["num_experts_per_tok"]),
                      moe_hidden=int(hf["moe_intermediate_size"]),
                      first_k_dense=_dense_prefix(list(hf.get("mlp_only_layers") or []), n_layers),
                      moe_router="softmax", moe_norm_topk=bool(hf.get("norm_topk_prob", True)))
    arch = "SDARMoeForCausalLM" if moe else "SDARForCausalLM"
    mask = first(hf.get("mask_token_id"), special_id(raw_tok, "mask"),
                 token_id(raw_tok, "<|MASK|>"), token_id(raw_tok, "<MASK>"),
                 architecture_id({"architectures": [arch]}, "mask"))
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(mask is not None and eos is not None, "SDAR: no mask or eos id")
    block = int(hf.get("block_size") or 4)
    return ModelConfig(
        name="sdar-moe" if moe else "sdar",
        vocab_size=emb[0], d_model=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        attn_head_dim=head_dim if head_dim * n_heads != d else None,
        mlp_hidden=int(hf.get("intermediate_size") or 0),
        rope_theta=rope_theta(hf, 1000000.0), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        mask_id=mask, eos_id=eos, pad_id=first(hf.get("pad_token_id"), eos),
        eot_id=token_id(raw_tok, "<|im_end|>"),
        attention="block_causal", block_align="zero", block_length=block,
        default_steps_per_block=block, time_conditioning=False, logit_shift=False,
        qkv_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or shape("lm_head.weight") is None,
        qk_norm=True, arch="llama",
        extra={"family": "sdar", "model_type": hf.get("model_type"), "architecture": arch},
        **fields,
    )


FORMAT = Format(family="sdar", model_types=("sdar", "sdar_moe"), tokenizer_fallback="qwen2",
                build_config=build_config, map_tensor=map_tensor,
                architectures=("SDARForCausalLM", "SDARMoeForCausalLM"))
