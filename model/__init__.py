"""The network and the diffusion maths: plain PyTorch, nothing of Ray or HTTP.

    from model import load_pretrained
    net, tok, cfg = load_pretrained("tiny-coder")                  # the embedded model
    net, tok, cfg = load_pretrained("ckpt/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)
    logits = net(ids)                                             # [B, L] -> [B, L, V]

What is here: config.py (ModelConfig, presets), transformer.py (DiffusionTransformer, the one
network every family is loaded onto), loaders/ (LLaDA, Dream, DiffuLLaMA, DiffuGPT, BD3-LM/MDLM
and our own checkpoints, from local directories, no remote code), tokenizer.py (tiny-coder's BPE)
and hf_tokenizer.py (published tokenizers, same interface), families.py (sampler defaults per
family), diffusion.py (noising, loss, block masks), sampling.py (the reference sampler),
cache.py (KV cache), checkpoint.py (our checkpoint format), train.py, data.py;
diffusion_gemma.py (DiffusionGemma's own network: causal encoder + bidirectional decoder, MoE,
self-conditioning) and uniform.py (uniform, renoising diffusion: its sampler and the
entropy-bound rule); moe.py (the mixture-of-experts layer of LLaDA2.x, LLaDA-MoE, SDAR-MoE:
routers, the grouped-GEMM expert path and its per-expert reference); lora.py (LoRA adapters as
hooks: many resident, one per batch row, LRU slots, merge) with loaders/lora.py (the PEFT
format) and train_lora.py (`dllm train --lora`).

The re-exports below are imported lazily, so `import model.config` stays light.
"""

from __future__ import annotations

__all__ = ["load_pretrained", "ModelConfig", "DiffusionTransformer"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from model.loaders import load_pretrained

        return load_pretrained
    if name == "ModelConfig":
        from model.config import ModelConfig

        return ModelConfig
    if name == "DiffusionTransformer":
        from model.transformer import DiffusionTransformer

        return DiffusionTransformer
    raise AttributeError(f"module 'model' has no attribute {name!r}")
