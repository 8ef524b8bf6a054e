"""Tiny DiffusionGemma checkpoints for tests: transformers' own classes, random weights, the
published directory layout (save_pretrained + a small tokenizer + generation_config.json).

    hf = hf_model(seed=0)                      # DiffusionGemmaForBlockDiffusion, eval, float32
    d = save_checkpoint(hf, tmp_path)          # config.json, model.safetensors, tokenizer, ...
    net, tok, cfg = load_pretrained(d)         # ours, on the same weights

transformers is the reference here and only here (tests); the product never imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

CANVAS = 8
VOCAB = 160
# 5 layers: sliding and global interleaved (the last must be global), a window shorter than a
# test prompt so the sliding layers really cut, experts 6 / top 2, global head_dim and K/V heads
# their own, widths multiples of 4 (model/moe.py's grouped GEMM runs on the CPU in fp32).
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
            num_global_key_value_heads=2, sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "sliding_attention", "full_attention"],
            num_experts=6, top_k_experts=2, moe_intermediate_size=16,
            max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=2)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8)


def hf_config(**text_overrides):
    from transformers import DiffusionGemmaConfig

    return DiffusionGemmaConfig(text_config={**TEXT, **text_overrides}, vision_config=VISION,
                                canvas_length=CANVAS)


def hf_model(seed: int = 0, **text_overrides):
    """transformers' DiffusionGemmaForBlockDiffusion with every text weight random, norms and
    scales around 1 and the encoder's and decoder's layer_scalar different (so a swapped
    scalar, a norm used as 1 + w, or a missed tie shows in the logits)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_config(**text_overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.decoder.named_parameters():
            if name.endswith(("norm.weight", "scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.startswith("self_conditioning.") and p.dim() == 2:
                # small: the signal feeds back step after step, and a large gain turns float32
                # rounding (1e-5) into different draws within a few steps (measured: x25 a step
                # at std 0.15, which no float32 implementation pair can follow token for token)
                p.copy_(0.04 * torch.randn(p.shape, generator=g))
            elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        enc = model.model.encoder.language_model
        for layer_e, layer_d in zip(enc.layers, model.model.decoder.layers, strict=True):
            layer_d.layer_scalar.copy_(0.7 + 0.6 * torch.rand(1, generator=g))
            layer_e.layer_scalar.copy_(0.7 + 0.6 * torch.rand(1, generator=g))
    return model


def tokenizer():
    """A word-level fast tokenizer over VOCAB ids: <pad>=0, <eos>=1, <bos>=2, words after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}w10 {% endif %}")
    return tok


def save_checkpoint(model, directory: Path, *, max_shard_size: str | None = None,
                    generation: dict | None = None) -> Path:
    """The published layout: save_pretrained (sharded when max_shard_size is given), the
    tokenizer files and generation_config.json with DiffusionGemma's sampler settings."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    directory = Path(directory)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    tokenizer().save_pretrained(directory)
    g = {**dict(max_denoising_steps=6, entropy_bound=0.5, t_min=0.4, t_max=0.8,
                stability_threshold=1, confidence_threshold=0.005), **(generation or {})}
    DiffusionGemmaGenerationConfig(
        max_denoising_steps=g["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(g["entropy_bound"])),
        t_min=g["t_min"], t_max=g["t_max"], stability_threshold=g["stability_threshold"],
        confidence_threshold=g["confidence_threshold"], eos_token_id=1, pad_token_id=0,
    ).save_pretrained(directory)
    return directory


def config_dict() -> dict:
    """The config.json of the tiny model, without transformers (our loader's input)."""
    return {"model_type": "diffusion_gemma", "canvas_length": CANVAS,
            "text_config": {**TEXT, "model_type": "diffusion_gemma_text"}}


def random_net(seed: int = 0, dtype: torch.dtype = torch.float64, **uniform_defaults):
    """Our network on the tiny config with hf_model's weight distributions (no transformers
    model in between): engine tests compare the engine with our own sampler on it."""
    from model.diffusion_gemma import DiffusionGemma
    from model.loaders.diffusion_gemma import build_config

    cfg = build_config(config_dict(), {}, None)
    cfg.extra["uniform_defaults"].update(uniform_defaults)
    net = DiffusionGemma(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("scalar"):
                p.copy_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            elif name.endswith(("norm.weight", "scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.startswith("self_cond."):
                p.copy_(0.04 * torch.randn(p.shape, generator=g))
            elif p.dim() == 3:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        net.tok_embeddings.weight[14].mul_(2.5)  # some canvases become stable (adaptive stop)
        net.tok_embeddings.weight[1].mul_(1.6)  # EOS ends some answers
    return net.to(dtype).eval()


def hf_tokenizer():
    """tokenizer() wrapped as the server sees a published tokenizer (model/hf_tokenizer.py)."""
    from model.hf_tokenizer import HFTokenizer

    return HFTokenizer(tokenizer(), mask_id=-1, eos_id=1, pad_id=0, name="dg-tiny")
