"""Fast-dLLM v2 (`model_type: "Fast_dLLM_Qwen"`, `Fast_dLLM_QwenForCausalLM`, NVlabs): Qwen2.5
weights fine-tuned for block diffusion, blocks aligned to position 0, logits shifted as Dream's.

Fast_dLLM_v2_1.5B / 7B are Qwen2.5-1.5B / 7B-Instruct shapes (1.5B ties its LM head to the
embedding, 7B does not); mask `|<MASK>|` 151665 (the hub modeling's `mask_id` default; it is in
the tokenizer's added tokens, not in config.json), stop token <|im_end|> 151645 (= config's
eos_token_id). Stored names are transformers' Qwen2 names, mapped by llama.map_hf_llama.

What the authors' code does, which the config does not say (hub modeling.py, read):
- q/k/v always carry a bias (`bias=True` in its attention, whatever `attention_bias` says);
- inference is block-causal over blocks of generate()'s `block_size` argument (32 by default),
  not config `bd_size` (a training setting): the prompt is prefilled up to its last whole block
  and its tail is denoised inside the first generated block (cfg.block_align "zero");
- the logits of a block are shifted (`cat([logits[:, :1], logits[:, :-1]])`): hidden state i-1
  predicts token i, so cfg.logit_shift, and each block after the first opens with one token
  decoded autoregressively (the argmax after the previous block's clean forward) before its
  diffusion: SamplingParams.ar_block_start, a family default (model/families.py);
- sub-block decoding (`small_block_size` 8, `threshold` 0.9 in its chatbot) is the sampler:
  SamplingParams.sub_block_length / confidence_threshold;
- the complementary-mask training path and `bd_size` play no part in inference.
Sliding-window layers (`use_sliding_window`) are refused; Fast-dLLM v2 ships without them.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.loaders.common import Format, first, require, special_id, token_id
from model.loaders.llama import llama_like_config, map_hf_llama

FAST_DLLM_MASK_ID = 151665  # hub modeling.py generate(mask_id=151665), '|<MASK>|'
FAST_DLLM_BLOCK = 32  # generate(block_size=32): the inference block, not config bd_size
MASK_TOKENS = ("|<MASK>|", "<|MASK|>", "<|mask|>")


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    require(not hf.get("use_sliding_window", False), "sliding-window attention is not supported")
    mask = first(hf.get("mask_token_id"), special_id(raw_tok, "mask"),
                 *(token_id(raw_tok, t) for t in MASK_TOKENS))
    vocab = map_hf_llama.shape(shapes, "embed_tokens.weight")
    if mask is None and vocab is not None and vocab[0] > FAST_DLLM_MASK_ID:
        mask = FAST_DLLM_MASK_ID
    require(mask is not None, "Fast-dLLM v2 checkpoint without a mask token (|<MASK>|)")
    eot = token_id(raw_tok, "<|im_end|>")
    eos = first(hf.get("eos_token_id"), eot, special_id(raw_tok, "eos"))
    require(eos is not None, "no eos_token_id in config.json or the tokenizer")
    return llama_like_config(
        hf, shapes, name="fast-dllm-v2", family="fast_dllm_v2", theta_default=1e6,
        max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        # pad = eos: the samplers ban a distinct pad id, and the authors' generate never bans
        # <|endoftext|> (Qwen's pad), so banning it would renormalise every confidence
        mask_id=mask, eos_id=eos, pad_id=eos,
        eot_id=eot, attention="block_causal", block_align="zero", block_length=FAST_DLLM_BLOCK,
        default_steps_per_block=FAST_DLLM_BLOCK, logit_shift=True, qkv_bias=True,
    )


FORMAT = Format(family="fast_dllm_v2", model_types=("Fast_dLLM_Qwen",), tokenizer_fallback="qwen2",
                build_config=build_config, map_tensor=map_hf_llama,
                architectures=("Fast_dLLM_QwenForCausalLM",))
