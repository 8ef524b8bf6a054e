"""Load a diffusion LM from a local directory, in the format it was published in.

    net, tok, cfg = load_pretrained("ckpt/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)
    net, tok, cfg = load_pretrained("tiny-coder")            # the embedded model
    net, tok, cfg = load_pretrained(d, tp_rank=r, tp_size=n)  # each rank reads only its slice
    load_pretrained(d, device=resolve_device("auto"), dtype=torch_dtype("bfloat16"))  # from text

The one entry point for `dllm generate --model DIR` and the server (`torch_dtype` and
`resolve_device` turn the dtype and device names of a command line or a YAML config into its
arguments). It returns our own network (model/transformer.py) with the published weights mapped
onto it, whatever the family: forward takes ids [B, L] and returns logits [B, L, V] where
logits[:, i] predicts token i (the shift of Dream-style models is applied inside), so every
sampler works on every model. No code from the checkpoint directory is ever run (no
trust_remote_code): architectures are re-implemented here.

Formats, detected from config.json (`model_type`; our own format by its field names):

| model_type   | family     | module     | attention     | logit shift |
|--------------|------------|------------|---------------|-------------|
| (none)       | tiny-coder | native.py  | from config   | from config |
| llada        | llada      | llada.py   | full          | no          |
| Dream        | dream      | dream.py   | full          | yes         |
| llama        | diffullama | llama.py   | full          | yes         |
| gpt2         | diffugpt   | gpt2.py    | full          | yes         |
| bd3lm        | bd3lm      | bd3lm.py   | block-causal  | no          |
| mdlm         | mdlm       | bd3lm.py   | full          | no          |
| llada2_moe   | llada2     | llada2.py  | block-causal* | no          |
| (LLaDAMoEModelLM) | llada_moe | llada_moe.py | full     | no          |
| sdar, sdar_moe | sdar     | sdar.py    | block-causal* | no          |
| Fast_dLLM_Qwen | fast_dllm_v2 | fast_dllm.py | block-causal* | yes      |
| diffusion_gemma | diffusion_gemma | diffusion_gemma.py | canvas over a causal cache | no (own network) |

`architectures` is read before model_type (LLaDA-MoE's config says "llada"). * blocks aligned
to position 0 (cfg.block_align "zero"). MoE layers: model/moe.py; mask ids missing from
config.json: special_ids.py.

A `model_type: "llama"` / `"gpt2"` directory is taken to be DiffuLLaMA / DiffuGPT: an ordinary
autoregressive Llama or GPT-2 loads too, but is not a diffusion model and will not denoise.
Per-family sampler defaults: model/families.py. The tokenizer is model/tokenizer.Tokenizer for our
own format and model/hf_tokenizer.HFTokenizer (same interface) for the published ones.

Loading: the net is built on the meta device (no random init of 8B parameters), safetensors
shards are streamed one at a time under a tqdm bar, each tensor is converted to `dtype` in the
copy that moves it to `device`, and with tp_size > 1 each rank reads and keeps only its slice
(model/loaders/tp.py; model/parallel.py adds the all-reduces when it is there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.config import CONFIG_FILE, PRESETS, ModelConfig
from model.loaders import (
    bd3lm,
    dream,
    fast_dllm,
    gpt2,
    llada,
    llada2,
    llada_moe,
    llama,
    native,
    sdar,
    tp,
)
from model.loaders import diffusion_gemma as diffusion_gemma_loader
from model.loaders.common import (
    Format,
    FormatError,
    build_on_meta,
    checkpoint_rope,
    read_json,
    read_shapes,
    stream_weights,
    weight_files,
)
from model.rope import apply_context_overrides
from model.transformer import DiffusionTransformer

log = logging.getLogger(__name__)

FORMATS: tuple[Format, ...] = (llada.FORMAT, dream.FORMAT, llama.FORMAT, gpt2.FORMAT, bd3lm.FORMAT,
                              diffusion_gemma_loader.FORMAT, llada2.FORMAT, llada_moe.FORMAT,
                              sdar.FORMAT, fast_dllm.FORMAT)
_BY_MODEL_TYPE = {mt: f for f in FORMATS for mt in f.model_types}
_BY_ARCHITECTURE = {a: f for f in FORMATS for a in getattr(f, "architectures", ())}

__all__ = ["load_pretrained", "detect_format", "resolve_path", "torch_dtype", "resolve_device",
           "FormatError", "FORMATS"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" -> the torch dtype (the names a YAML config or a
    command line gives); ValueError for anything else."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; any other name is returned as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_path(path_or_preset: str | Path) -> Path:
    """A directory, or "tiny-coder" for the embedded model's directory."""
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    if str(path_or_preset) == "tiny-coder":
        from model.checkpoint import EMBEDDED_DIR

        return EMBEDDED_DIR
    if str(path_or_preset) in PRESETS:
        raise FileNotFoundError(f"preset {path_or_preset!r} has no bundled weights; download the "
                                "checkpoint and pass its directory")
    raise FileNotFoundError(f"no model directory {p}")


def detect_format(config: dict) -> Format | None:
    """The published format of a config.json, or None for the project's own format."""
    if native.is_native(config):
        return None
    # architectures first: LLaDA-MoE's config says model_type "llada" like dense LLaDA
    for arch in config.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type is None:
        raise FormatError("config.json has no model_type and is not this project's format")
    raise FormatError(f"model_type {model_type!r} is not supported; supported: "
                      f"{sorted(_BY_MODEL_TYPE)} and this project's own format")


def load_pretrained(path_or_preset: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1,
                    *, progress: bool = True, rope_scaling: dict | None = None,
                    max_model_len: int | None = None
                    ) -> tuple[DiffusionTransformer, object, ModelConfig]:
    """-> (net in eval mode on `device`, tokenizer, config); see the module docstring.
    rope_scaling / max_model_len: deploy-time context overrides (model/rope.py
    apply_context_overrides), e.g. {"rope_type": "linear", "factor": 4} to serve 4x the trained
    context."""
    directory = resolve_path(path_or_preset)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    raw_config = read_json(config_path)
    fmt = detect_format(raw_config)
    if fmt is diffusion_gemma_loader.FORMAT:  # its own network (model/diffusion_gemma.py)
        if rope_scaling is not None:
            raise FormatError("rope_scaling is not supported for DiffusionGemma (its global "
                              "layers' proportional rotary is served as published)")
        net, tok, cfg = diffusion_gemma_loader.load_diffusion_gemma(
            directory, device, dtype, tp_rank, tp_size, progress=progress)
        if max_model_len is not None:  # a shorter context than the 131k trained one
            cfg.max_seq_len = min(cfg.max_seq_len, int(max_model_len))
        return net, tok, cfg
    files = weight_files(directory)
    if fmt is None:
        from model.tokenizer import Tokenizer

        cfg = ModelConfig.from_dict(raw_config)
        tokenizer = Tokenizer.load(directory)
        map_tensor = native.map_tensor
    else:
        from model.hf_tokenizer import HFTokenizer, load_hf_tokenizer

        raw_tok = load_hf_tokenizer(directory, fmt.tokenizer_fallback)
        cfg = fmt.build_config(raw_config, read_shapes(files), raw_tok)
        checkpoint_rope(cfg, raw_config)  # rope_scaling / partial rotary of config.json
        cfg.name = directory.resolve().name
        tokenizer = HFTokenizer(raw_tok, mask_id=cfg.mask_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                                eot_id=cfg.eot_id, name=cfg.name)
        map_tensor = fmt.map_tensor
    if rope_scaling is not None or max_model_len is not None:
        apply_context_overrides(cfg, rope_scaling=rope_scaling, max_model_len=max_model_len)
    if tp_size > 1:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside 0..{tp_size - 1}")
        # fewer KV heads than ranks (LLaDA2.0-flash: 4 over 8 GPUs): each head is repeated so
        # every rank holds one, as vLLM / SGLang replicate them
        map_tensor = tp.replicate_kv_heads(cfg, tp_size, map_tensor)
        tp.check_divisible(cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden, tp_size)
        if cfg.n_experts:
            tp.check_experts_divisible(cfg.n_experts, cfg.shared_expert_hidden, tp_size)
    net = build_on_meta(cfg)
    stream_weights(net, files, map_tensor, device=device, dtype=dtype, tp_rank=tp_rank,
                   tp_size=tp_size, desc=f"loading {cfg.name}", progress=progress)
    net.eval()
    log.info("loaded %s (%s, %.1fM parameters%s) from %s", cfg.name,
             cfg.extra.get("family", "tiny-coder"), net.num_params() / 1e6,
             f", TP rank {tp_rank}/{tp_size}" if tp_size > 1 else "", directory)
    return net, tokenizer, cfg
