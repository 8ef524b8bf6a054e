"""Rotary embedding frequencies with context-extension scaling, and the deploy-time overrides.

    scaling = normalise_rope_scaling({"rope_type": "yarn", "factor": 4.0}, trained_len=32768)
    cfg.rope_scaling = scaling                         # a plain dict: it round-trips config.json
    inv_freq, attn_scale = rope_frequencies(cfg)       # [rotary_dim / 2] float32, float
    cos, sin = kernels.rotary.rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta,
                                             inv_freq=inv_freq, attention_scaling=attn_scale)
    apply_context_overrides(cfg, rope_scaling={...}, max_model_len=131072)   # serve_config.yaml

The scaling types are those published checkpoints carry in `rope_scaling` (transformers 4.x) or
`rope_parameters` (5.x), computed as transformers' ROPE_INIT_FUNCTIONS compute them (the tests
pin every type to them):
- linear (position interpolation): every frequency divided by `factor`;
- dynamic (NTK-aware): the base raised to stretch the longest wavelength to the served length.
  transformers re-derives it from each forward's longest position; here it is evaluated once at
  the served context (cfg.max_seq_len), as vLLM does, because cached K/V written at one length
  must match queries rotated at another (a per-call base would change the cache's rotation);
- yarn: per-frequency blend of interpolation and extrapolation between the beta_fast/beta_slow
  correction dims, plus the attention factor (0.1 ln(factor) + 1 by default) that multiplies cos
  and sin, so q.k grows by its square, as transformers applies it;
- llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp in between.
Partial rotary (`partial_rotary_factor` < 1: LLaDA2.x, GLM, Phi) rotates only the first
cfg.rotary_dim dims of each head; kernels/rotary.py passes the rest through.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# The keys each type reads (beyond rope_type and factor); others are kept but unused.
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def normalise_rope_scaling(scaling: dict | None, trained_len: int) -> dict | None:
    """A checkpoint's or an operator's scaling dict -> the canonical dict (None: plain rotary).

    Accepts the transformers 4.x key `type` as well as `rope_type`; fills
    `original_max_position_embeddings` with the trained context when absent (dynamic and yarn
    read it as the length the model was trained at). Raises ValueError for an unknown type, a
    missing field or a factor < 1."""
    if not scaling:
        return None
    d = {k: v for k, v in dict(scaling).items() if k not in ("rope_theta", "partial_rotary_factor")}
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(ROPE_TYPES[1:])}")
    missing = [k for k in _REQUIRED[rope_type] if d.get(k) is None]
    if missing:
        raise ValueError(f"{rope_type} rope scaling needs {', '.join(missing)}")
    factor = float(d["factor"])
    if factor < 1.0:
        raise ValueError(f"rope scaling factor must be >= 1, got {factor}")
    d["factor"] = factor
    d.setdefault("original_max_position_embeddings", int(trained_len))
    d["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
    return {"rope_type": rope_type, **d}


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    # [dim / 2]: the same arange-as-int64-then-float as transformers, so values match bit for bit
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def scaled_inv_freq(theta: float, dim: int, scaling: dict | None,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim / 2] float32 on the CPU, attention scaling of cos and sin).

    dim: the rotary dims (head_dim * partial_rotary_factor); seq_len: the served context
    (dynamic NTK only; default original_max_position_embeddings)."""
    if scaling is None:
        return _base_inv_freq(theta, dim), 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    orig = int(scaling["original_max_position_embeddings"])
    if kind == "linear":
        return _base_inv_freq(theta, dim) / factor, 1.0
    if kind == "dynamic":
        L = max(seq_len or orig, orig)
        base = theta * ((factor * L / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "yarn":
        return _yarn(theta, dim, factor, orig, scaling)
    if kind == "llama3":
        return _llama3(theta, dim, factor, orig, scaling), 1.0
    raise ValueError(f"rope scaling type {kind!r} is not supported")


def _yarn(theta: float, dim: int, factor: float, orig: int, s: dict) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength turns `rotations` times over the trained context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 - ramp  # 1: keep the trained frequency (high frequencies)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


def _llama3(theta: float, dim: int, factor: float, orig: int, s: dict) -> torch.Tensor:
    inv = _base_inv_freq(theta, dim)
    low_f, high_f = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    low_wavelen, high_wavelen = orig / low_f, orig / high_f
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def rope_frequencies(cfg) -> tuple[torch.Tensor, float]:
    """A ModelConfig's rotary: (inv_freq [cfg.rotary_dim / 2] float32 CPU, attention scaling)."""
    return scaled_inv_freq(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling, cfg.max_seq_len)


def context_limit(cfg) -> int:
    """The longest context the rotary supports: the trained length x the scaling factor (no
    limit is known for learned positions, which the table size fixes instead)."""
    s = cfg.rope_scaling
    if s is None:
        return int(cfg.extra.get("trained_max_seq_len", cfg.max_seq_len))
    return int(s["original_max_position_embeddings"] * s["factor"])


def apply_context_overrides(cfg, rope_scaling: dict | None = None,
                            max_model_len: int | None = None) -> None:
    """Deploy-time overrides (serve_config.yaml `model.rope_scaling`, `model.max_model_len`),
    in place, before the network is built. The trained context is remembered in
    cfg.extra["trained_max_seq_len"]. Raises ValueError for a context past what the rotary
    supports (serving past the trained length needs interpolation) or for learned positions."""
    trained = int(cfg.extra.get("trained_max_seq_len", cfg.max_seq_len))
    if rope_scaling is not None:
        if cfg.arch == "gpt2":
            raise ValueError("rope_scaling: this model has learned positions, not rotary")
        base = cfg.rope_scaling["original_max_position_embeddings"] if cfg.rope_scaling else trained
        cfg.rope_scaling = normalise_rope_scaling(rope_scaling, base)
    if max_model_len is not None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if cfg.arch == "gpt2" and max_model_len > trained:
            raise ValueError(f"max_model_len {max_model_len}: learned positions stop at {trained}")
        cfg.extra["trained_max_seq_len"] = trained
        limit = context_limit(cfg)
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} is past this model's rotary context ({limit}: "
                f"trained {trained}" + (f" x factor {cfg.rope_scaling['factor']:g}"
                                        if cfg.rope_scaling else "") +
                "); set model.rope_scaling, e.g. {rope_type: linear, factor: "
                f"{math.ceil(max_model_len / trained)}}}")
        cfg.max_seq_len = int(max_model_len)
    elif rope_scaling is not None:
        # scaling without a length: serve the whole stretched context
        cfg.extra["trained_max_seq_len"] = trained
        cfg.max_seq_len = max(cfg.max_seq_len, context_limit(cfg))
    log.info("context: %d tokens (trained %d), rope scaling %s", cfg.max_seq_len, trained,
             cfg.rope_scaling)
