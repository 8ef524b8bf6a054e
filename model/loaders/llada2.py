"""LLaDA2.0 / 2.1 / 2.2 (`model_type: "llada2_moe"`, `LLaDA2MoeModelLM`): BailingMoeV2 blocks,
block diffusion with blocks aligned to position 0.

LLaDA2.0-mini (16B, 1.4B active): hidden 2048, 20 layers, 16 heads / 4 KV heads of 128, vocab
157184, 256 experts of width 512, top-8 in 8 groups (4 kept), 1 shared expert, first layer dense
(intermediate 5120), partial rotary 0.5, rope_theta 600000; LLaDA2.0-flash (100B): 32 layers,
hidden 4096, 256 experts of width 1024. Mask 156895 and EOS 156892 are generate()'s defaults,
not always in config.json (model/loaders/special_ids.py).

Stored names (prefix model.):

    word_embeddings.weight                          -> tok_embeddings.weight
    layers.{i}.input_layernorm.weight               -> layers.{i}.attn_norm.weight
    layers.{i}.attention.query_key_value.weight     -> layers.{i}.attn.{wq,wk,wv}.weight (rows
                                                       [H*hd | Hkv*hd | Hkv*hd], split here)
    layers.{i}.attention.query_layernorm.weight     -> layers.{i}.attn.q_norm.weight  (per head)
    layers.{i}.attention.key_layernorm.weight       -> layers.{i}.attn.k_norm.weight
    layers.{i}.attention.dense.weight               -> layers.{i}.attn.wo.weight
    layers.{i}.post_attention_layernorm.weight      -> layers.{i}.mlp_norm.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight       -> layers.{i}.mlp.{w1,w3,w2}.weight (dense)
    layers.{i}.mlp.gate.weight                      -> layers.{i}.mlp.gate.weight  (router)
    layers.{i}.mlp.gate.expert_bias                 -> layers.{i}.mlp.expert_bias
    layers.{i}.mlp.experts.{j}.{gate,up,down}_proj  -> layers.{i}.mlp.w_gate_up / w_down [j]
    layers.{i}.mlp.shared_experts.{gate,up,down}_proj -> layers.{i}.mlp.shared.{w1,w3,w2}
    norm.weight, lm_head.weight                     -> norm.weight, lm_head.weight

What the authors' modeling code does, whatever config.json says: routing is always sigmoid
scores + expert_bias, group-limited (n_group / topk_group, groups rated by their two best),
weights the unbiased scores of the chosen experts normalised to 1 and times
routed_scaling_factor (`score_function`, `norm_topk_prob`, `moe_router_enable_expert_bias` are
not read); `rotary_dim` is ignored (partial_rotary_factor decides); q/k RMSNorm per head; NeoX
rotary on the first head_dim * partial_rotary_factor dims; no logit shift. Attention is
block-causal over blocks of 32 aligned to position 0 (cfg.block_align "zero").

A multi-token-prediction layer (num_nextn_predict_layers; stored as layers past
num_hidden_layers or under `mtp`) is not used by diffusion decoding: skipped with a log line.
LLaDA2.2's token editing (`delete_token_id`, `split_token_id`) is not reproduced: the ids are
recorded in cfg.extra and never generated (model/families.py), and a request for editing is
refused.
"""

from __future__ import annotations

import logging

import torch

from model.config import ModelConfig
from model.loaders.common import (
    Format,
    NameMap,
    Target,
    first,
    require,
    rope_theta,
    special_id,
    split_layer,
    strip_prefix,
    token_id,
)
from model.loaders.experts import expert_targets
from model.loaders.llama import LLAMA_NORMS, swiglu_names
from model.loaders.special_ids import architecture_id

log = logging.getLogger(__name__)

ARCHITECTURE = "LLaDA2MoeModelLM"
PREFIXES = ("model.",)

_names = NameMap(
    prefixes=PREFIXES,
    top={"word_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
         "lm_head.weight": "lm_head.weight"},
    layer={
        **LLAMA_NORMS, **swiglu_names(),
        "attention.query_layernorm.weight": "attn.q_norm.weight",
        "attention.key_layernorm.weight": "attn.k_norm.weight",
        "attention.dense.weight": "attn.wo.weight",
        "mlp.gate.weight": "mlp.gate.weight", "mlp.gate.expert_bias": "mlp.expert_bias",
        **swiglu_names("mlp.shared_experts", "mlp.shared"),
    },
)


def _rows(lo: int, hi: int):
    def f(t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi]
    return f


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    """A tensor of the multi-token-prediction layer(s): `mtp*` names, or layers past the
    decoder's (DeepSeek-V3's convention, which BailingMoeV2 follows)."""
    if name.startswith("mtp") or ".mtp" in name:
        return True
    layer = split_layer(name)
    return layer is not None and layer[0] >= cfg.n_layers


def map_tensor(key: str, cfg: ModelConfig) -> list[Target] | None:
    name = strip_prefix(key, PREFIXES)
    if _is_mtp(name, cfg):
        return []  # not used by diffusion decoding (logged once by build_config)
    layer = split_layer(name)
    if layer is not None and layer[1].startswith("attention.query_key_value."):
        i, kind = layer[0], layer[1].rsplit(".", 1)[-1]
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if kind == "bias" and not cfg.qkv_bias:
            return None
        return [Target(f"layers.{i}.attn.wq.{kind}", _rows(0, q)),
                Target(f"layers.{i}.attn.wk.{kind}", _rows(q, q + kv)),
                Target(f"layers.{i}.attn.wv.{kind}", _rows(q + kv, q + 2 * kv))]
    experts = expert_targets(name, cfg)
    if experts is not None:
        return experts
    return _names(key, cfg)


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    require(hf.get("hidden_act", "silu") == "silu",
            f"hidden_act {hf.get('hidden_act')!r}: only SiLU experts are supported")
    require(not hf.get("norm_head", False), "norm_head=true (a normalised LM head) is not supported")
    require(not hf.get("use_sliding_window", False), "sliding-window attention is not supported")
    shape = lambda n: _names.shape(shapes, n)  # noqa: E731
    require(shape("layers.0.attention.dense.bias") is None,
            "a bias on attention.dense (use_bias) is not supported")
    emb = shape("word_embeddings.weight")
    require(emb is not None, "no model.word_embeddings.weight in the checkpoint")
    d = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = int(hf.get("head_dim") or d // n_heads)
    n_layers = int(hf["num_hidden_layers"])
    n_experts = int(hf.get("num_experts") or 0)
    require(n_experts > 0, "LLaDA2 checkpoint without num_experts")
    moe_hidden = int(hf["moe_intermediate_size"])
    n_mtp = int(hf.get("num_nextn_predict_layers") or 0)
    mtp_names = [k for k in shapes if "mtp" in k
                 or ((lay := split_layer(strip_prefix(k, PREFIXES))) and lay[0] >= n_layers)]
    if n_mtp or mtp_names:
        log.info("LLaDA2: %d multi-token-prediction layer(s) (%d tensors) ignored: diffusion "
                 "decoding does not use them", n_mtp, len(mtp_names))
    editing = {k: int(hf[k]) for k in ("delete_token_id", "split_token_id")
               if hf.get(k) is not None}
    if editing:
        log.info("LLaDA2.2 token editing ids %s: editing is not supported; these tokens are "
                 "never generated", editing)
    mask = first(hf.get("mask_token_id"), special_id(raw_tok, "mask"),
                 architecture_id({"architectures": [ARCHITECTURE]}, "mask"))
    eos = first(hf.get("eos_token_id"), architecture_id({"architectures": [ARCHITECTURE]}, "eos"),
                special_id(raw_tok, "eos"))
    require(mask is not None and eos is not None, "LLaDA2: no mask or eos id")
    eot = token_id(raw_tok, "<|role_end|>")
    return ModelConfig(
        name="llada2",
        vocab_size=emb[0], d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        attn_head_dim=head_dim if head_dim != d // n_heads or d % n_heads else None,
        mlp_hidden=int(hf.get("intermediate_size") or 0),
        rope_theta=rope_theta(hf, 600000.0),
        # the config class's default; checkpoint_rope takes config.json's value when present
        partial_rotary_factor=float(hf.get("partial_rotary_factor") or 0.5),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        mask_id=mask, eos_id=eos, pad_id=first(hf.get("pad_token_id"), eos),
        eot_id=eot if eot not in (None, mask) else None,
        attention="block_causal", block_align="zero", block_length=32,
        default_steps_per_block=32, time_conditioning=False, logit_shift=False,
        qkv_bias=bool(hf.get("use_qkv_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or shape("lm_head.weight") is None,
        qk_norm=bool(hf.get("use_qk_norm", True)),
        n_experts=n_experts, experts_per_token=int(hf["num_experts_per_tok"]),
        moe_hidden=moe_hidden,
        shared_expert_hidden=moe_hidden * int(hf.get("num_shared_experts") or 0),
        first_k_dense=int(hf.get("first_k_dense_replace") or 0),
        # the authors' gate, whatever score_function / norm_topk_prob say (module docstring)
        moe_router="sigmoid_group", moe_norm_topk=True, moe_expert_bias=True,
        moe_n_group=int(hf.get("n_group") or 1), moe_topk_group=int(hf.get("topk_group") or 1),
        moe_routed_scaling=float(hf.get("routed_scaling_factor") or 1.0),
        arch="llama",
        extra={"family": "llada2", "model_type": hf.get("model_type"),
               "architecture": ARCHITECTURE, **({"token_editing": editing} if editing else {})},
    )


FORMAT = Format(family="llada2", model_types=("llada2_moe",), tokenizer_fallback=None,
                build_config=build_config, map_tensor=map_tensor, architectures=(ARCHITECTURE,))
