"""DiffusionGemma (`model_type: "diffusion_gemma"`, `DiffusionGemmaForBlockDiffusion`): the text
network of the published directory (config.json with `text_config`, safetensors shards, tokenizer,
generation_config.json) onto model/diffusion_gemma.py.

    net, tok, cfg = load_diffusion_gemma(directory, device="cuda", dtype=torch.bfloat16)
    net, tok, cfg = load_diffusion_gemma(directory, tp_rank=r, tp_size=n)   # this rank's slices

(load_pretrained dispatches here on the model_type.) What the published layout holds, read from
transformers' modeling code and a save_pretrained directory: every text weight is stored once,
under `model.decoder.*` (the encoder is tied to it); the encoder's own `layer_scalar` buffers under
`model.encoder.language_model.layers.{i}.layer_scalar`; no `lm_head` (tied to the embedding);
experts fused as `experts.gate_up_proj` [E, 2I, d] (gate rows first) and `experts.down_proj`
[E, d, I]; no `v_proj` on full-attention layers. `model.encoder.vision_tower.*` and
`model.encoder.embed_vision.*` are the vision tower: the text path never reads them (no memory,
no time), and the server refuses image parts (deployments/jobs.py).

Per-layer shapes: `per_layer_config` {layer: {head_dim, num_key_value_heads}} as transformers 5.x
writes it, or Gemma-4 style `global_head_dim` / `num_global_key_value_heads` for the full layers.
generation_config.json gives the sampler defaults (max_denoising_steps, entropy bound, t_min /
t_max, stability and confidence thresholds), kept in cfg.extra["uniform_defaults"]
(model/families.py reads them). Tensor parallelism: q/k/v and the MLP gate/up are split by output
rows (whole heads per rank), o_proj and MLP down by input columns, the experts by whole experts
(expert parallel, model/loaders/tp.py's MoE plan); the router, norms, embeddings and the
self-conditioning block stay whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model.config import ModelConfig
from model.diffusion_gemma import GLOBAL, SLIDING, DiffusionGemma, GemmaShape, gemma_config
from model.loaders.common import (
    Format,
    FormatError,
    Target,
    first,
    read_json,
    read_shapes,
    require,
    split_layer,
    stream_weights,
    weight_files,
)
from model.transformer import skip_parameter_init

log = logging.getLogger(__name__)

GENERATION_FILE = "generation_config.json"
PREFIX = "model.decoder."
ENCODER_PREFIX = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.",
                   "model.vision_tower.", "model.embed_vision.")
# transformers' defaults (DiffusionGemmaGenerationConfig._get_default_generation_params)
SAMPLER_DEFAULTS = {"max_denoising_steps": 48, "entropy_bound": 0.1, "t_min": 0.4, "t_max": 0.8,
                    "stability_threshold": 1, "confidence_threshold": 0.005}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_mlp_norm.weight",
    "pre_feedforward_layernorm_2.weight": "moe_norm.weight",
    "post_feedforward_layernorm_2.weight": "post_moe_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.shared.w1.weight",
    "mlp.up_proj.weight": "mlp.shared.w3.weight",
    "mlp.down_proj.weight": "mlp.shared.w2.weight",
    "router.proj.weight": "mlp.router.proj.weight",
    "router.scale": "mlp.router.scale",
    "router.per_expert_scale": "mlp.router.per_expert_scale",
    "experts.gate_up_proj": "mlp.w_gate_up",  # [E, 2I, d], gate rows first: our layout
    "experts.down_proj": "mlp.w_down",
    "layer_scalar": "dec_scalar",
}
_TOP = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "self_conditioning.pre_norm.weight": "self_cond.pre_norm.weight",
    "self_conditioning.gate_proj.weight": "self_cond.mlp.w1.weight",
    "self_conditioning.up_proj.weight": "self_cond.mlp.w3.weight",
    "self_conditioning.down_proj.weight": "self_cond.mlp.w2.weight",
}


def text_config(hf: dict) -> dict:
    """The text part of a DiffusionGemma config.json (the whole dict for a text-only one)."""
    if hf.get("model_type") == "diffusion_gemma_text":
        return hf
    tc = hf.get("text_config")
    require(isinstance(tc, dict), "diffusion_gemma config.json without a text_config")
    return tc


def _layer_overrides(tc: dict, layer_types: list[str]) -> dict[int, dict]:
    per = {int(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
    if per:
        return per
    over = {"head_dim": tc.get("global_head_dim", 512)}
    if tc.get("num_global_key_value_heads") is not None:
        over["num_key_value_heads"] = tc["num_global_key_value_heads"]
    return {i: dict(over) for i, t in enumerate(layer_types) if t == GLOBAL}


def _rope(tc: dict, kind: str, default: tuple[float, float, str]) -> tuple[float, float]:
    p = (tc.get("rope_parameters") or {}).get(kind) or {}
    rope_type = p.get("rope_type", default[2])
    require(rope_type == default[2], f"{kind}: rope_type {rope_type!r} is not supported "
                                     f"(DiffusionGemma uses {default[2]!r})")
    require(float(p.get("factor", 1.0)) == 1.0, f"{kind}: scaled rotary is not supported")
    return float(p.get("rope_theta", default[0])), float(p.get("partial_rotary_factor", default[1]))


def shape_from_hf(hf: dict) -> GemmaShape:
    """GemmaShape from a config.json (or transformers' config.to_dict())."""
    tc = text_config(hf)
    n = int(tc["num_hidden_layers"])
    layer_types = list(tc.get("layer_types") or
                       [SLIDING if (i + 1) % 6 else GLOBAL for i in range(n)])
    layer_types[-1] = GLOBAL  # transformers forces it
    require(set(layer_types) <= {SLIDING, GLOBAL}, f"unknown layer types {set(layer_types)}")
    require(tc.get("use_bidirectional_attention") in (None, "vision"),
            "use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
    require(tc.get("hidden_activation", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
            f"hidden_activation {tc.get('hidden_activation')!r} is not supported")
    require(not tc.get("attention_bias", False), "attention_bias is not supported")
    over = _layer_overrides(tc, layer_types)
    hd, kv = int(tc.get("head_dim", 256)), int(tc["num_key_value_heads"])
    g = [over.get(i, {}) for i, t in enumerate(layer_types) if t == GLOBAL]
    g_hd = {int(o.get("head_dim", hd)) for o in g} or {hd}
    g_kv = {int(o.get("num_key_value_heads", kv)) for o in g} or {kv}
    require(len(g_hd) == 1 and len(g_kv) == 1, "global layers with different shapes")
    require(all(not o for i, o in over.items() if layer_types[i] == SLIDING),
            "per-layer overrides on sliding layers are not supported")
    require(tc.get("num_experts") and tc.get("top_k_experts"),
            "DiffusionGemma without experts (num_experts / top_k_experts) is not supported")
    return GemmaShape(
        layer_types=tuple(layer_types), sliding_window=int(tc.get("sliding_window", 512)),
        head_dim=hd, global_head_dim=g_hd.pop(), n_kv_heads=kv, n_global_kv_heads=g_kv.pop(),
        intermediate=int(tc["intermediate_size"]), n_experts=int(tc["num_experts"]),
        top_k=int(tc["top_k_experts"]), moe_intermediate=int(tc["moe_intermediate_size"]),
        rope_sliding=_rope(tc, SLIDING, (10_000.0, 1.0, "default")),
        rope_global=_rope(tc, GLOBAL, (1_000_000.0, 0.25, "proportional")),
        softcap=float(tc.get("final_logit_softcapping") or 30.0),
        canvas_length=int(hf.get("canvas_length") or 256),
        image_token_id=hf.get("image_token_id"))


def sampler_defaults(directory: Path | None) -> dict:
    """generation_config.json's sampler settings over transformers' defaults."""
    out = dict(SAMPLER_DEFAULTS)
    path = directory / GENERATION_FILE if directory is not None else None
    if path is not None and path.exists():
        g = read_json(path)
        for k in ("max_denoising_steps", "t_min", "t_max", "stability_threshold",
                  "confidence_threshold"):
            if g.get(k) is not None:
                out[k] = g[k]
        sc = g.get("sampler_config") or {}
        if sc.get("entropy_bound") is not None:
            out["entropy_bound"] = float(sc["entropy_bound"])
        if g.get("eos_token_id") is not None:
            out["eos_token_id"] = g["eos_token_id"]
    return out


def build_config(hf: dict, shapes: dict, raw_tok, directory: Path | None = None) -> ModelConfig:
    tc = text_config(hf)
    shape = shape_from_hf(hf)
    emb = shapes.get(PREFIX + "embed_tokens.weight")
    vocab = int(emb[0]) if emb else int(tc["vocab_size"])
    gen = sampler_defaults(directory)
    eos_ids = gen.pop("eos_token_id", None)
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    eos = first(tc.get("eos_token_id"), hf.get("eos_token_id"), 1)
    # end of turn: the chat template's <turn|> (Gemma 4) or any other EOS generation_config lists
    eot = next((int(i) for i in eos_ids if int(i) != eos), None)
    return gemma_config(
        "diffusion-gemma", vocab, int(tc["hidden_size"]), int(tc["num_hidden_layers"]),
        int(tc["num_attention_heads"]), shape, norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(tc.get("max_position_embeddings", 131072)), eos_id=eos,
        pad_id=first(tc.get("pad_token_id"), 0), eot_id=eot,
        extra={"model_type": "diffusion_gemma", "uniform_defaults": gen})


def map_tensor(key: str, cfg: ModelConfig) -> list[Target] | None:
    """Stored name -> our parameters ([] for the vision tower: known, not loaded)."""
    if key.startswith(VISION_PREFIXES):
        return []
    if key.startswith(ENCODER_PREFIX):
        layer = split_layer(key[len(ENCODER_PREFIX):])
        if layer is not None and layer[1] == "layer_scalar":
            return [Target(f"layers.{layer[0]}.enc_scalar")]
        return None  # everything else of the encoder is tied to the decoder and not stored
    if key == "lm_head.weight":
        return []  # tied to the embedding when a checkpoint stores it anyway
    if not key.startswith(PREFIX):
        return None
    name = key[len(PREFIX):]
    if name in _TOP:
        return [Target(_TOP[name])]
    layer = split_layer(name)
    if layer is None:
        return None
    i, rest = layer
    if rest in _LAYER:
        return [Target(f"layers.{i}.{_LAYER[rest]}")]
    return None


FORMAT = Format(family="diffusion_gemma", model_types=("diffusion_gemma", "diffusion_gemma_text"),
                tokenizer_fallback=None, build_config=build_config, map_tensor=map_tensor)


def check_tp(cfg: ModelConfig, tp_size: int) -> None:
    shape = GemmaShape.from_cfg(cfg)
    for what, n in (("num_attention_heads", cfg.n_heads), ("num_key_value_heads", shape.n_kv_heads),
                    ("num_global_key_value_heads", shape.n_global_kv_heads),
                    ("intermediate_size", shape.intermediate), ("num_experts", shape.n_experts)):
        if n % tp_size:
            raise ValueError(f"tensor parallelism over {tp_size} ranks needs {what} ({n}) "
                             f"divisible by {tp_size}")


def build_net(cfg: ModelConfig, directory: Path, device, dtype: torch.dtype, tp_rank: int = 0,
              tp_size: int = 1, progress: bool = True) -> DiffusionGemma:
    """The network on `device` with this rank's slice of the weights in `directory`."""
    if tp_size > 1:
        check_tp(cfg, tp_size)
    with torch.device("meta"), skip_parameter_init():
        net = DiffusionGemma(cfg)  # full shapes: stream_weights cuts each rank's slice
    stream_weights(net, weight_files(directory), map_tensor, device=device, dtype=dtype,
                   tp_rank=tp_rank, tp_size=tp_size, desc=f"loading {cfg.name}",
                   progress=progress)
    net.tp_size = tp_size
    net.reset_buffers(device)
    return net.eval()


def load_diffusion_gemma(directory: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1,
                         *, progress: bool = True):
    """-> (net, tokenizer, cfg) from a published DiffusionGemma directory (module docstring)."""
    from model.hf_tokenizer import HFTokenizer, load_hf_tokenizer

    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    files = weight_files(directory)
    raw_tok = _tokenizer(directory, load_hf_tokenizer)
    cfg = build_config(hf, read_shapes(files), raw_tok, directory)
    cfg.name = directory.resolve().name
    tokenizer = None
    if raw_tok is not None:
        tokenizer = HFTokenizer(raw_tok, mask_id=cfg.mask_id, eos_id=cfg.eos_id,
                                pad_id=cfg.pad_id, eot_id=cfg.eot_id, name=cfg.name)
    net = build_net(cfg, directory, device, dtype, tp_rank, tp_size, progress)
    log.info("loaded %s (diffusion_gemma, %.1fM parameters%s) from %s", cfg.name,
             net.num_params() / 1e6, f", TP rank {tp_rank}/{tp_size}" if tp_size > 1 else "",
             directory)
    return net, tokenizer, cfg


def _tokenizer(directory: Path, load_hf_tokenizer):
    try:
        return load_hf_tokenizer(directory, None)
    except (OSError, ValueError, FormatError) as e:
        if any(directory.glob("tokenizer*")):
            raise
        log.warning("no tokenizer in %s (%s): token ids only", directory, e)
        return None
