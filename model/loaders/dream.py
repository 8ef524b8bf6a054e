"""Dream (`model_type: "Dream"`): Qwen2.5 weights and names, bidirectional, logits shifted.

Dream-v0-7B: hidden 3584, 28 layers, 28 heads / 4 KV heads, intermediate 18944, vocab 152064,
rope_theta 1e6, rms_norm_eps 1e-6, q/k/v with bias (o_proj without), untied LM head;
mask_token_id 151666, eos = pad = 151643 (<|endoftext|>), end of turn <|im_end|> 151645.
Tensor names are transformers' Qwen2 names (model.embed_tokens, model.layers.{i}.self_attn.
{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm,
lm_head), mapped by llama.map_hf_llama.

Dream's generate shifts logits right by one (`cat([logits[:, :1], logits[:, :-1]])`): hidden
state i-1 predicts token i; our network applies that shift itself (cfg.logit_shift).
Its tokenizer ships as vocab.json + merges.txt with a custom `DreamTokenizer` class in auto_map;
we read the same files with transformers' own Qwen2Tokenizer instead of running that code.
Context: Dream-v0 is trained at 2048 tokens, so max_seq_len is capped there even though
config.json inherits Qwen2.5's 131072 max_position_embeddings.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.loaders.common import Format, first, require, special_id, token_id
from model.loaders.llama import llama_like_config, map_hf_llama

DREAM_CONTEXT = 2048


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    require(not hf.get("use_sliding_window", False), "sliding-window attention is not supported")
    mask = first(hf.get("mask_token_id"), special_id(raw_tok, "mask"), token_id(raw_tok, "<|mask|>"))
    require(mask is not None, "Dream checkpoint without mask_token_id")
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(eos is not None, "no eos_token_id in config.json or the tokenizer")
    pad = first(hf.get("pad_token_id"), special_id(raw_tok, "pad"), eos)
    return llama_like_config(
        hf, shapes, name="dream", family="dream", theta_default=1e6,
        max_seq_len=min(int(hf.get("max_position_embeddings", DREAM_CONTEXT)), DREAM_CONTEXT),
        mask_id=mask, eos_id=eos, pad_id=pad, eot_id=token_id(raw_tok, "<|im_end|>"),
        attention="full", block_length=32, default_steps_per_block=32,
        logit_shift=True, qkv_bias=True,
    )


FORMAT = Format(family="dream", model_types=("Dream", "dream"), tokenizer_fallback="qwen2",
                build_config=build_config, map_tensor=map_hf_llama)
