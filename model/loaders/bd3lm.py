"""BD3-LM (`model_type: "bd3lm"`) and MDLM (`"mdlm"`): the DiT backbone of the Kuleshov group's
masked-diffusion models, block-causal for BD3-LM, bidirectional for MDLM.

Their HF config: hidden_dim, cond_dim, n_blocks, n_heads, model_length, vocab_size (50258 = GPT-2
+ mask), block_size (BD3-LM), adaln, time_conditioning, causal. Stored names (prefix backbone.):

    vocab_embed.embedding [V, d]                -> tok_embeddings.weight
    sigma_map.mlp.{0,2}.{weight,bias}           -> time_embed.mlp.{0,2} (256 sinusoid features)
    blocks.{i}.norm1.weight / norm2.weight      -> layers.{i}.attn_norm / mlp_norm (LayerNorm,
                                                   weight only)
    blocks.{i}.attn_qkv.weight [3d, d]          -> rows [0:d | d:2d | 2d:3d] -> attn.wq / wk / wv
    blocks.{i}.attn_out.weight                  -> attn.wo.weight
    blocks.{i}.mlp.{0,2}.{weight,bias}          -> mlp.fc / mlp.proj (GELU tanh between)
    blocks.{i}.adaLN_modulation.{weight,bias}   -> layers.{i}.ada (gate biases minus 1, below)
    output_layer.norm_final.weight              -> norm.weight
    output_layer.linear.{weight,bias}           -> lm_head (with bias)
    output_layer.adaLN_modulation.*             -> final_ada
    rotary_emb.inv_freq, sampling_eps_*         -> dropped (buffers; DDiT rotary base is 10000)

The DDiT block: (shift, scale, gate) x 2 = adaLN(c), c = silu(sigma_map(sigma));
x += gate_msa * attn_out(attn(modulate(norm1(x)))), x += gate_mlp * mlp(modulate(norm2(x))),
modulate(h) = h * (1 + scale) + shift, NeoX rotary on q and k (base 10000). Our adaLN block
computes the same with (1 + gate), so the gate rows of the adaLN bias are stored minus 1 (exact:
a bias shift). The final layer: linear(modulate(norm_final(x))).

Time: both published model families are trained with time_conditioning=false, where the backbone
replaces sigma by 0 (DITBackbone.forward): the adaLN input is the constant silu(sigma_map(0)).
We load that as time_scale = 0, so the network ignores the t the sampler passes. A checkpoint
with time_conditioning=true feeds sigma(t) of the log-linear schedule, which we do not
reproduce: it is refused. So is `causal=true` (their autoregressive baseline, not a diffusion
model). The GPT-2 tokenizer is not part of these checkpoints: copy gpt2's tokenizer.json (or
vocab.json + merges.txt) into the directory; the mask is then id vocab_size - 1 (50257).
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.loaders.common import Format, NameMap, Target, chunk, first, require, special_id


def _gate_bias(t: torch.Tensor) -> torch.Tensor:
    """DiT adds gate * branch; our block adds (1 + gate) * branch: gate rows (3rd and 6th of six
    [d] chunks: shift, scale, gate for attention, then for the MLP) get -1."""
    d = t.shape[0] // 6
    t = t.clone()
    t[2 * d:3 * d] -= 1
    t[5 * d:6 * d] -= 1
    return t


map_tensor = NameMap(
    prefixes=("backbone.",),
    top={
        "vocab_embed.embedding": "tok_embeddings.weight",
        "sigma_map.mlp.0.weight": "time_embed.mlp.0.weight",
        "sigma_map.mlp.0.bias": "time_embed.mlp.0.bias",
        "sigma_map.mlp.2.weight": "time_embed.mlp.2.weight",
        "sigma_map.mlp.2.bias": "time_embed.mlp.2.bias",
        "output_layer.norm_final.weight": "norm.weight",
        "output_layer.linear.weight": "lm_head.weight",
        "output_layer.linear.bias": "lm_head.bias",
        "output_layer.adaLN_modulation.weight": "final_ada.weight",
        "output_layer.adaLN_modulation.bias": "final_ada.bias",
    },
    layer={
        "norm1.weight": "attn_norm.weight",
        "norm2.weight": "mlp_norm.weight",
        "attn_out.weight": "attn.wo.weight",
        "mlp.0.weight": "mlp.fc.weight",
        "mlp.0.bias": "mlp.fc.bias",
        "mlp.2.weight": "mlp.proj.weight",
        "mlp.2.bias": "mlp.proj.bias",
        "adaLN_modulation.weight": "ada.weight",
        "adaLN_modulation.bias": Target("ada.bias", _gate_bias),
        # 'b s (three h d)': q rows first, then k, then v
        "attn_qkv.weight": tuple(Target(f"attn.{w}.weight", chunk(j, 3))
                                 for j, w in enumerate(("wq", "wk", "wv"))),
    },
    dropped=("rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max", "sampling_eps"),
)


def build_config(hf: dict, shapes: dict, raw_tok) -> ModelConfig:
    model_type = hf.get("model_type", "bd3lm")
    require(not hf.get("causal", False),
            "causal=true is BD3-LM's autoregressive baseline, not a diffusion model")
    adaln = bool(hf.get("adaln", True))
    require(not (adaln and hf.get("time_conditioning", False)),
            "time_conditioning=true (adaLN fed sigma(t) of the log-linear schedule) is not "
            "reproduced; the published BD3-LM/MDLM checkpoints use time_conditioning=false")

    def shape(name):
        return map_tensor.shape(shapes, name)

    emb = shape("vocab_embed.embedding")
    require(emb is not None, "no backbone.vocab_embed.embedding in the checkpoint")
    vocab, d = emb
    n_heads = int(hf["n_heads"])
    fc = shape("blocks.0.mlp.0.weight")
    sigma = shape("sigma_map.mlp.0.weight")
    require(not adaln or sigma is not None, "adaln=true but no sigma_map weights")
    head = shape("output_layer.linear.weight")
    mask = first(special_id(raw_tok, "mask"), hf.get("mask_token_id"), vocab - 1)
    eos = first(hf.get("eos_token_id"), special_id(raw_tok, "eos"))
    require(eos is not None, "no end-of-text token: give the directory GPT-2's tokenizer files")
    block_causal = model_type == "bd3lm"
    block_size = int(hf.get("block_size") or 1) if block_causal else 32
    return ModelConfig(
        name=model_type,
        vocab_size=vocab,
        d_model=d,
        n_layers=int(hf["n_blocks"]),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        mlp_hidden=fc[0] if fc else 4 * d,
        rope_theta=10000.0,
        norm_eps=1e-5,  # F.layer_norm's default
        max_seq_len=int(hf.get("model_length", 1024)),
        mask_id=mask, eos_id=eos, pad_id=first(special_id(raw_tok, "pad"), eos), eot_id=None,
        attention="block_causal" if block_causal else "full",
        block_length=block_size,
        default_steps_per_block=block_size,
        time_conditioning=adaln,
        time_embed_dim=int(hf.get("cond_dim", sigma[0] if sigma else 128)) if adaln else 64,
        time_freq_dim=sigma[1] if sigma else 256,
        time_scale=0.0,  # sigma is forced to 0 (time_conditioning=false): t is ignored
        logit_shift=False,
        qkv_bias=False,
        tie_embeddings=head is None,
        lm_head_bias=shape("output_layer.linear.bias") is not None,
        arch="dit",
        extra={"family": model_type, "model_type": model_type},
    )


FORMAT = Format(family="bd3lm", model_types=("bd3lm", "mdlm"), tokenizer_fallback="gpt2",
                build_config=build_config, map_tensor=map_tensor)
