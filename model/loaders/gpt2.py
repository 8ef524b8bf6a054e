"""DiffuGPT (`model_type: "gpt2"`): GPT-2 weights and names, bidirectional, logits shifted.

Stored names: transformers GPT2LMHeadModel (`transformer.h.{i}...`), bare GPT-2 (`h.{i}...`), or
DiffuGPT's own DiscreteDiffusionModel (`denoise_model.h.{i}...`, `embed_tokens.weight`). GPT-2's
Conv1D keeps weights as [in, out], the transpose of nn.Linear, and fuses q, k, v in c_attn:

    wte.weight | embed_tokens.weight       -> tok_embeddings.weight (tied with lm_head)
    wpe.weight                             -> pos_embeddings.weight
    h.{i}.ln_1.{weight,bias}               -> layers.{i}.attn_norm
    h.{i}.attn.c_attn.weight [d, 3d]       -> transpose, rows [0:d | d:2d | 2d:3d] -> attn.wq/wk/wv
    h.{i}.attn.c_attn.bias [3d]            -> split in three -> attn.wq/wk/wv.bias
    h.{i}.attn.c_proj.{weight,bias}        -> attn.wo (weight transposed)
    h.{i}.ln_2.{weight,bias}               -> layers.{i}.mlp_norm
    h.{i}.mlp.c_fc.{weight,bias}           -> mlp.fc (transposed)
    h.{i}.mlp.c_proj.{weight,bias}         -> mlp.proj (transposed)
    ln_f.{weight,bias}                     -> norm
    lm_head.weight                         -> the tied embedding (stored or not)
    h.{i}.attn.bias / masked_bias          -> dropped: the causal-mask buffers DiffuGPT disables

The block is GPT-2's with the causal mask removed (DiffuGPT fills attn.bias with True): LayerNorm,
learned positions, GELU (tanh approximation, "gelu_new"), attention scaled by 1/sqrt(head_dim).
Mask token: the tokenizer's mask_token; else config.json's mask_token_id; else DiffuGPT's own
fallbacks (LLaMA-Factory loader.py): id 50257 appended for a resized 50258-row embedding
(DiffuGPT-medium's "[¨M¨]"), id 10541 for an unresized GPT-2 vocabulary (DiffuGPT-small).
"""

from __future__ import annotations

import logging

from model.config import ModelConfig
from model.loaders.common import (
    Format,
    NameMap,
    Target,
    chunk,
    first,
    require,
    special_id,
    transpose,
)

log = logging.getLogger(__name__)

GPT2_VOCAB = 50257
DIFFUGPT_SMALL_MASK_ID = 10541  # LLaMA-Factory/src/llamafactory/model/loader.py
_QKV = ("wq", "wk", "wv")

map_tensor = NameMap(
    prefixes=("transformer.", "denoise_model.", "model.transformer."),
    top={"wte.weight": "tok_embeddings.weight", "embed_tokens.weight": "tok_embeddings.weight",
         "wpe.weight": "pos_embeddings.weight", "ln_f.weight": "norm.weight",
         "ln_f.bias": "norm.bias", "lm_head.weight": "lm_head.weight"},
    layer={
        "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
        "ln_2.weight": "mlp_norm.weight", "ln_2.bias": "mlp_norm.bias",
        "attn.c_proj.bias": "attn.wo.bias", "mlp.c_fc.bias": "mlp.fc.bias",
        "mlp.c_proj.bias": "mlp.proj.bias",
        # Conv1D weights are [in, out]
        "attn.c_proj.weight": Target("attn.wo.weight", transpose),
        "mlp.c_fc.weight": Target("mlp.fc.weight", transpose),
        "mlp.c_proj.weight": Target("mlp.proj.weight", transpose),
        # [d, 3d] -> q, k, v each [d, d] after the transpose
        "attn.c_attn.weight": tuple(Target(f"attn.{w}.weight", chunk(j, 3, dim=1, then=transpose))
                                    for j, w in enumerate(_QKV)),
        "attn.c_attn.bias": tuple(Target(f"attn.{w}.bias", chunk(j, 3))
                                  for j, w in enumerate(_QKV)),
    },
    dropped_in_layer=("attn.bias", "attn.masked_bias"),
)


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    require(act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
            f"activation_function {act!r}: only GPT-2's tanh GELU is supported")
    require(hf.get("scale_attn_weights", True), "scale_attn_weights=false is not supported")
    require(not hf.get("scale_attn_by_inverse_layer_idx", False),
            "scale_attn_by_inverse_layer_idx is not supported")

    def shape(name):
        return map_tensor.shape(shapes, name)

    emb = shape("wte.weight") or shape("embed_tokens.weight") or shape("lm_head.weight")
    require(emb is not None, "no token embedding (wte / embed_tokens / lm_head) in the checkpoint")
    pos = shape("wpe.weight")
    require(pos is not None, "no wpe.weight (learned positions) in the checkpoint")
    fc = shape("h.0.mlp.c_fc.weight")
    d = int(hf.get("n_embd", emb[1]))
    vocab = emb[0]
    mask = first(special_id(raw_tok, "mask"), hf.get("mask_token_id"))
    if mask is None:
        mask = GPT2_VOCAB if vocab > GPT2_VOCAB else DIFFUGPT_SMALL_MASK_ID
        log.warning("no mask token in tokenizer or config.json; using DiffuGPT's id %d", mask)
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(eos is not None, "no eos_token_id in config.json or the tokenizer")
    return ModelConfig(
        name="diffugpt",
        vocab_size=vocab,  # DiffuGPT resized the embedding for its mask token
        d_model=d,
        n_layers=int(hf["n_layer"]),
        n_heads=int(hf["n_head"]),
        n_kv_heads=int(hf["n_head"]),
        mlp_hidden=fc[1] if fc else int(hf.get("n_inner") or 4 * d),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_seq_len=pos[0],
        mask_id=mask, eos_id=eos, pad_id=first(special_id(raw_tok, "pad"), eos), eot_id=None,
        attention="full", block_length=32, default_steps_per_block=32,
        time_conditioning=False, logit_shift=True, qkv_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        arch="gpt2",
        extra={"family": "diffugpt", "model_type": "gpt2"},
    )


FORMAT = Format(family="diffugpt", model_types=("gpt2",), tokenizer_fallback="gpt2",
                build_config=build_config, map_tensor=map_tensor)
