"""The project's own checkpoint format: config.json + tokenizer.json + model.safetensors.

    save_checkpoint(out_dir, net, tokenizer)
    net, tokenizer, cfg = load_checkpoint("model/weights/tiny-coder", device="cpu", dtype=torch.float32)

Other published formats (LLaDA, Dream, ...) are mapped onto the same modules by the loaders.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import DiffusionTransformer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
EMBEDDED_DIR = Path(__file__).parent / "weights" / "tiny-coder"


def save_checkpoint(directory: str | Path, net: DiffusionTransformer, tokenizer: Tokenizer,
                    dtype: torch.dtype | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net.cfg.save(directory)
    tokenizer.save(directory)
    state = {}
    for name, tensor in net.state_dict().items():
        if net.cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied to tok_embeddings.weight; stored once
        t = tensor.detach().cpu().contiguous()
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "dllm-serve"})
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[DiffusionTransformer, Tokenizer, ModelConfig]:
    directory = Path(directory)
    cfg = ModelConfig.load(directory)
    tokenizer = Tokenizer.load(directory)
    with torch.device("meta"):
        net = DiffusionTransformer(cfg, init_weights=False)
    state = load_file(str(directory / WEIGHTS_FILE))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        net.lm_head.weight = net.tok_embeddings.weight
    net = net.to(device).eval()
    log.info("loaded %s (%.1fM parameters) from %s", cfg.name, net.num_params() / 1e6, directory)
    return net, tokenizer, cfg
