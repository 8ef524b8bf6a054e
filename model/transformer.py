"""The denoising network: a Llama-family transformer without a causal mask.

    net = DiffusionTransformer(cfg)
    logits = net(input_ids, t=t)                       # [B, L] -> [B, L, V]; logits[:, i] predicts token i
    logits = net(ids, positions=pos, t=t, attn=ctx)    # with a mask or a KV cache (model/cache.py)

Blocks: pre-norm RMSNorm, NeoX rotary, grouped-query attention, SwiGLU; optionally per-head
q/k RMSNorm (`qk_norm`) and a mixture-of-experts MLP after the first `first_k_dense` layers
(`n_experts`, model/moe.py) for Qwen3/SDAR, LLaDA2.x and LLaDA-MoE. With time conditioning
(Mercury's recipe, after DiT) a timestep embedding of the per-token noise level t feeds each block
an adaptive LayerNorm: shift/scale on both norms and a gate on both residual branches. Clean
tokens (prompt, finished blocks) carry t = 0 and the active block its masked fraction, exactly as
in training, so cached K/V of clean blocks are the ones the model was trained to attend to.

Attention is delegated to an `attn` context (dense mask or KV cache), so the same module serves
training (block-diffusion mask over noisy+clean copies), reference sampling and the engine.
`arch="gpt2"` switches the block to GPT-2's (LayerNorm, learned positions, GELU MLP) for DiffuGPT;
`arch="dit"` to the DiT block of BD3-LM/MDLM (bias-free LayerNorm, rotary, GELU MLP).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import Ragged, attention, ragged_attention
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary, rotary_cos_sin
from model.config import ModelConfig
from model.moe import MoE
from model.rope import rope_frequencies


class AttentionContext(Protocol):
    """How a layer's attention sees keys: a dense mask, a KV cache, a paged pool."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H, Lq, hd]; k, v: [B, Hkv, Lq, hd] for the new tokens (rotary applied)."""
        ...


class DenseAttention:
    """No cache: every query sees the keys of this call, filtered by an optional mask.

    rows: the same visibility as per-row lengths (kernels.attention.Ragged, e.g. the engine's
    right-padded full-attention rows), which lets kernels/attention.py take flash-attn's varlen
    path; the mask stays what the SDPA path reads. Not for static shapes: engine/cuda_graphs.py
    rebinds only `mask`, so a graph-bound context carries no rows."""

    def __init__(self, mask: torch.Tensor | None = None, rows: Ragged | None = None):
        self.mask = mask  # bool [B or 1, 1, Lq, Lk], True = may attend
        self.rows = rows

    def attend(self, layer, q, k, v):
        if self.rows is not None:
            return ragged_attention(q, k, v, self.rows, self.mask)
        return attention(q, k, v, self.mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, shift=None, scale=None):
        return rms_norm(x, self.weight, self.eps, shift, scale)


class LayerNorm(nn.LayerNorm):
    """GPT-2's LayerNorm with the same (shift, scale) modulation hook as RMSNorm."""

    def forward(self, x, shift=None, scale=None):
        y = super().forward(x)
        if scale is not None:
            y = y * (1 + scale)
        if shift is not None:
            y = y + shift
        return y


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.arch == "gpt2")  # DiT: weight only


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP -> [.., time_embed_dim] (DiT's embedder)."""

    def __init__(self, dim: int, freq_dim: int = 128, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = (t.float() * self.scale)[..., None] * freqs  # scale t to DiT's 0..1000 range
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.arch == "gpt2")
        self.rotary = cfg.arch != "gpt2"
        # Qwen3 / LLaDA2.x / LLaDA-MoE: RMSNorm over each head of q and k, before the rotary
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, attn: AttentionContext, layer: int):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.wk(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.wv(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rotary(q, k, cos, sin)
        out = attn.attend(layer, q, k, v)  # [B, H, L, hd]
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU without biases (w2(silu(w1 x) * w3 x)) for "llama"; GPT-2's two-layer GELU MLP with
    biases (proj(gelu_tanh(fc x))) for "gpt2" and "dit", whose checkpoints share that MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        if self.swiglu:
            self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)  # gate
            self.w3 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)  # up
            self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)  # down
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.mlp_hidden)
            self.proj = nn.Linear(cfg.mlp_hidden, cfg.d_model)

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _moe(cfg: ModelConfig) -> MoE:
    """The mixture-of-experts MLP of a config with n_experts (model/moe.py)."""
    return MoE(cfg.d_model, cfg.n_experts, cfg.experts_per_token, cfg.moe_hidden,
               router=cfg.moe_router, norm_topk_prob=cfg.moe_norm_topk,
               expert_bias=cfg.moe_expert_bias, n_group=cfg.moe_n_group,
               topk_group=cfg.moe_topk_group, routed_scaling_factor=cfg.moe_routed_scaling,
               shared_hidden=cfg.shared_expert_hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        # MoE families keep a dense MLP in their first `first_k_dense` layers (LLaDA2.x: 1)
        self.mlp = _moe(cfg) if cfg.n_experts and layer >= cfg.first_k_dense else MLP(cfg)
        # adaLN: temb -> (shift, scale, gate) for attention and MLP. Zero-initialised so the
        # untrained block is a plain pre-norm block (scale 1+0, gate 1+0), which trains faster
        # on CPU budgets than DiT's gate-0 start.
        self.ada = nn.Linear(cfg.time_embed_dim, 6 * cfg.d_model) if cfg.time_conditioning else None

    def forward(self, x, temb, cos, sin, attn, layer):
        if self.ada is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, attn, layer)
            return x + self.mlp(self.mlp_norm(x))
        # temb: [B, L or 1, E] -> six [B, L or 1, d] modulations
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(temb)).chunk(6, dim=-1)
        x = x + (1 + g1) * self.attn(self.attn_norm(x, sh1, sc1), cos, sin, attn, layer)
        return x + (1 + g2) * self.mlp(self.mlp_norm(x, sh2, sc2))


@contextlib.contextmanager
def skip_parameter_init() -> Iterator[None]:
    """Layers built inside leave their parameters uninitialised (torch.nn.init's fills become
    no-ops): for modules built on the meta device whose parameters a loader assigns. On meta,
    nn.Embedding's normal_ goes through torch's reference decompositions and imports
    torch._dynamo: 2.5 s of a replica's start on the CPU, for values nobody keeps."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


class DiffusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        """init_weights=False: parameters left as allocated (skip_parameter_init), for
        loaders that build on the meta device and assign every parameter."""
        super().__init__()
        with contextlib.nullcontext() if init_weights else skip_parameter_init():
            self._build(cfg, init_weights)

    def _build(self, cfg: ModelConfig, init_weights: bool) -> None:
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) \
            if cfg.arch == "gpt2" else None
        self.time_embed = TimestepEmbedder(cfg.time_embed_dim, cfg.time_freq_dim, cfg.time_scale) \
            if cfg.time_conditioning else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.final_ada = nn.Linear(cfg.time_embed_dim, 2 * cfg.d_model) \
            if cfg.time_conditioning else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if init_weights:
            self.apply(self._init_weights)
            for m in [blk.ada for blk in self.layers] + [self.final_ada]:
                if m is not None:  # adaLN starts as the identity modulation (see Block)
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _rope(self, device) -> tuple[torch.Tensor, float]:
        """The rotary's inv_freq [rotary_dim / 2] on `device` and its attention scaling
        (model/rope.py: scaling type, partial rotary), computed once per device and config.
        Not a buffer: loaders build the net on the meta device and fill parameters only."""
        key = (str(device), self.cfg.rope_theta, self.cfg.rotary_dim, self.cfg.max_seq_len,
               repr(self.cfg.rope_scaling))
        cached = getattr(self, "_rope_cache", None)
        if cached is None or cached[0] != key:
            inv_freq, scale = rope_frequencies(self.cfg)
            cached = (key, inv_freq.to(device), scale)
            self._rope_cache = cached
        return cached[1], cached[2]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                t: torch.Tensor | None = None, attn: AttentionContext | None = None,
                logits_slice: slice | torch.Tensor | None = None,
                hidden: torch.Tensor | None = None,
                layers: tuple[int, int] | None = None) -> torch.Tensor:
        """input_ids: [B, L]; positions: [B, L] (default 0..L-1); t: [B] or [B, L] noise level of
        each token (0 = clean; required for time-conditioned models). Returns logits [B, L, V]
        (or [B, L', V] for `logits_slice`, to skip the LM head on positions nobody reads: a slice,
        or a long tensor [B, L'] of positions per row, as the engine's batches need; with
        cfg.logit_shift index L, the token after the input, may be asked for too).

        layers=(lo, hi) runs only layers lo..hi-1 (the engine's chunked prefill, which writes a
        long prompt's K/V a few layers per iteration): `hidden` [B, L, d] is the input of layer
        lo (None: the embeddings, lo = 0), and for hi < n_layers the result is the hidden state
        [B, L, d] after layer hi-1 instead of logits."""
        B, L = input_ids.shape
        cfg = self.cfg
        if positions is None:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        attn = attn if attn is not None else DenseAttention()
        x = self.tok_embeddings(input_ids) if hidden is None else hidden  # [B, L, d]
        cos = sin = None
        if self.pos_embeddings is not None:
            if hidden is None:
                x = x + self.pos_embeddings(positions)
        else:
            inv_freq, attn_scale = self._rope(input_ids.device)
            cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype=x.dtype,
                                      inv_freq=inv_freq, attention_scaling=attn_scale)
        temb = None
        if self.time_embed is not None:
            if t is None:
                t = torch.zeros(B, device=input_ids.device)
            t = t.float()
            temb = self.time_embed(t[:, None] if t.dim() == 1 else t)  # [B, L or 1, E]
        lo, hi = layers if layers is not None else (0, len(self.layers))
        for i in range(lo, hi):
            x = self.layers[i](x, temb, cos, sin, attn, i)
        if hi < len(self.layers):
            return x  # [B, L, d]: the input of layer hi (a chunked prefill's next group)
        if self.final_ada is not None:
            shift, scale = self.final_ada(F.silu(temb)).chunk(2, dim=-1)
            x = self.norm(x, shift, scale)
        else:
            x = self.norm(x)
        if cfg.logit_shift:
            # hidden state i-1 predicts token i (AR-adapted models); position 0 keeps its own.
            # Index L (one past the input) holds the last state: the next token after the input,
            # which a logits_slice may ask for (Fast-dLLM v2's autoregressive block start).
            n_in = x.shape[1]
            x = torch.cat([x[:, :1], x], dim=1)
            if logits_slice is None:
                x = x[:, :n_in]
        if isinstance(logits_slice, torch.Tensor):
            x = x.gather(1, logits_slice[:, :, None].expand(-1, -1, x.shape[-1]))
        elif logits_slice is not None:
            x = x[:, logits_slice]
        return self.lm_head(x)
