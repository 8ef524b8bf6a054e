"""Model configuration: one dataclass, named presets, JSON round trip.

    cfg = ModelConfig.from_name("tiny-coder")     # a preset
    cfg = ModelConfig.load("model/weights/tiny-coder")  # a directory holding config.json
    cfg.save(out_dir)

Everything the network and the samplers need to know about a model lives here, so that a
checkpoint directory is fully described by its config.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

AttentionLayout = Literal["full", "block_causal"]

CONFIG_FILE = "config.json"


@dataclass
class ModelConfig:
    name: str = "tiny-coder"
    # tiny-coder's shape is set by its training budget, not the 24 MB cap: two CPU cores train
    # at ~1000 tokens/s on a 7M-parameter net (measured), so a ~5M net sees more data in the
    # same hours, and 4096 BPE tokens keep the LM head at 1M parameters.
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 5
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: 2 KV heads halve the KV cache
    mlp_hidden: int = 640  # SwiGLU hidden ~ 8/3 * d_model, rounded to a multiple of 64
    rope_theta: float = 10000.0
    # Context extension of the rotary (model/rope.py): None, or {"rope_type": "linear" |
    # "dynamic" | "yarn" | "llama3", "factor": ..., ...} as checkpoints' rope_scaling carry it.
    rope_scaling: dict | None = None
    # Rotate only this fraction of each head's dims (LLaDA2.x: 0.5); the rest pass through.
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    # Special token ids (the tokenizer puts them first in the vocabulary).
    mask_id: int = 0
    eos_id: int = 1
    pad_id: int = 2
    eot_id: int | None = None  # end-of-turn for chat models (LLaDA <|eot_id|>, Qwen <|im_end|>)
    # Attention layout: "full" (LLaDA, Dream: bidirectional over everything) or
    # "block_causal" (block diffusion: a block sees earlier blocks and itself).
    attention: AttentionLayout = "block_causal"
    block_length: int = 32
    # Time conditioning: a timestep embedding feeding adaptive LayerNorm (Mercury / DiT recipe).
    time_conditioning: bool = True
    time_embed_dim: int = 64
    # Dream/DiffuLLaMA/DiffuGPT were adapted from AR models: hidden state i-1 predicts token i.
    # The network applies the shift inside, so logits[:, i] always predicts token i.
    logit_shift: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = True
    # Architecture family of the block: "llama" (RMSNorm, rotary, SwiGLU), "gpt2"
    # (LayerNorm, learned positions, GELU MLP) for DiffuGPT checkpoints, or "dit" (bias-free
    # LayerNorm, rotary, GELU MLP with biases) for BD3-LM / MDLM checkpoints.
    arch: Literal["llama", "gpt2", "dit"] = "llama"
    # Timestep embedder input: t * time_scale feeds time_freq_dim sinusoid features. BD3-LM/MDLM
    # read 256 features of sigma unscaled, and their published checkpoints are trained without
    # time conditioning (sigma forced to 0): time_scale = 0 reproduces that, the net ignores t.
    time_freq_dim: int = 128
    time_scale: float = 1000.0
    lm_head_bias: bool = False  # DiT's output layer carries a bias
    # Per-head width when it is not d_model / n_heads (Qwen3 / SDAR-4B: 2560 / 32 heads, 128 each).
    attn_head_dim: int | None = None
    # RMSNorm over each head of q and k before the rotary (Qwen3/SDAR, LLaDA2.x, LLaDA-MoE).
    qk_norm: bool = False
    # Mixture of experts (model/moe.py). n_experts 0: a dense MLP in every layer (every family
    # before LLaDA2.x). Layers [0, first_k_dense) keep the dense MLP of width mlp_hidden.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_hidden: int = 0  # width of each routed expert
    shared_expert_hidden: int = 0  # width of the shared expert(s) every token takes (0: none)
    first_k_dense: int = 0
    # "softmax" (Qwen3-MoE / OLMoE / LLaDA-MoE) or "sigmoid_group" (LLaDA2.x: group-limited
    # sigmoid top-k with expert bias)
    moe_router: Literal["softmax", "sigmoid_group"] = "softmax"
    moe_norm_topk: bool = False  # renormalise the k routing weights to sum to 1
    moe_expert_bias: bool = False  # a per-expert bias (expert_bias) added to the router scores
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_routed_scaling: float = 1.0
    # Where blocks start (block-causal models): "prompt" = the prompt is one bidirectional
    # segment and blocks start where it ends (BD3-LM, tiny-coder); "zero" = blocks are aligned
    # to position 0, the prompt itself is cut into blocks that attend block-causally and
    # generation starts mid-block, the canvas padded to a block boundary (LLaDA2.x, SDAR,
    # Fast-dLLM v2: their authors' generate).
    block_align: Literal["prompt", "zero"] = "prompt"
    # Sampler defaults for this model (a server may override per request).
    default_steps_per_block: int = 8
    extra: dict = field(default_factory=dict)

    # --- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head the rotary turns (even; the first ones, as transformers does)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads and not self.attn_head_dim:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        if self.attention not in ("full", "block_causal"):
            raise ValueError(f"attention must be 'full' or 'block_causal', got {self.attention!r}")
        if self.arch not in ("llama", "gpt2", "dit"):
            raise ValueError(f"arch must be 'llama', 'gpt2' or 'dit', got {self.arch!r}")
        if self.block_align not in ("prompt", "zero"):
            raise ValueError(f"block_align must be 'prompt' or 'zero', got {self.block_align!r}")
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} must be in "
                             f"1..n_experts ({self.n_experts})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], "
                             f"got {self.partial_rotary_factor}")

    # --- presets -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = dict(d.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(**{k: v for k, v in d.items() if k in known and k != "extra"}, extra=extra)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def _published(**shape) -> dict:
    """A published full-attention diffusion LM: no time conditioning, untied LM head, blocks of
    32 at 8 steps each by default (the samplers' defaults; a request may override them)."""
    return dict(attention="full", block_length=32, time_conditioning=False, tie_embeddings=False,
                default_steps_per_block=8, **shape)


PRESETS: dict[str, dict] = {
    # The embedded model: 5.04M parameters (5,036,928 with the LM head tied to the embedding),
    # trained on CPU from the Python standard library.
    "tiny-coder": dict(name="tiny-coder"),
    # LLaDA-8B (GSAI-ML/LLaDA-8B-Base): a Llama block without the causal mask.
    "llada-8b": _published(
        name="llada-8b", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        mlp_hidden=12288, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=4096, mask_id=126336,
        eos_id=126081, pad_id=126081, eot_id=126348, logit_shift=False, qkv_bias=False),
    # Dream-v0-7B (Dream-org/Dream-v0-Base-7B): Qwen2.5-7B shapes, shifted logits.
    "dream-7b": _published(
        name="dream-7b", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        mlp_hidden=18944, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=2048, mask_id=151666,
        eos_id=151643, pad_id=151643, eot_id=151645, logit_shift=True, qkv_bias=True),
}
