"""DiffusionGemma's text network (Google, `diffusion_gemma`), natively: a causal encoder that
writes K/V and a bidirectional decoder that denoises a canvas over them, one set of weights.

    shape = GemmaShape.from_cfg(cfg)                 # cfg.extra["diffusion_gemma"], set by the loader
    net = DiffusionGemma(cfg)
    cache = GemmaCache(net, batch=1, max_len=4096)   # contiguous reference cache (the engine pages it)
    net.encode(prompt_ids, positions, cache.context(causal=True))            # writes K/V
    sc = net.soft_embedding(prev_logits)              # self-conditioning state [B, C, d] (or None)
    logits = net.denoise(canvas_ids, positions, cache.context(), sc)         # reads K/V only

Architecture (checked against transformers' modeling_diffusion_gemma.py, which tests pin us to):
- Layers are "sliding_attention" (window W, own head_dim, K/V heads, rotary theta 1e4) or
  "full_attention" (global: head_dim `global_head_dim`, `num_global_key_value_heads`, no v_proj:
  the values are the un-normed, un-rotated keys, then a scale-free RMSNorm; "proportional"
  partial rotary: the first `partial_rotary_factor * hd / 2` frequencies of theta 1e6 over the
  full head_dim, the rest 0, i.e. those channels pass unrotated). q and k are RMS-normed per
  head and attention is unscaled (scale 1.0: the norms set the temperature).
- Each layer: x += post_attn_norm(attn(in_norm(x))); then a dense GeGLU MLP and a routed MoE run
  side by side on the same residual, each with its own pre/post norms, and
  x = (x + post_ffn_norm(mlp + moe)) * layer_scalar. The router RMS-normalises x (no weight),
  scales by `router.scale * d^-0.5`, softmaxes over experts in float32, keeps the top k,
  renormalises them and multiplies by `per_expert_scale`. Experts are GeGLU, fused 3-D tensors
  `w_gate_up` [E, 2I, d] / `w_down` [E, d, I] (the published layout) run through model/moe.py's
  shared expert function (per-token routed, grouped GEMM); the router is DiffusionGemma's own.
- Embeddings are scaled by sqrt(d) (the scale cast to the weight dtype, as Gemma does); the LM
  head is the embedding (tied); logits are float32 and soft-capped: 30 * tanh(z / 30).
- The encoder and decoder share every weight except `layer_scalar` (one per layer for each).
  The encoder is causal (sliding layers: a query sees the W keys up to itself) and writes K/V;
  its last layer's FFN and the final norm are skipped (nothing reads them) unless a test asks for
  the hidden states. The decoder sees the cache and the whole canvas bidirectionally; in sliding
  layers only the last W - 1 cached keys (transformers' sliding cache keeps W - 1).
- Self-conditioning: every canvas embedding goes through a gated block,
  post_norm(embed + down(gelu(gate(n)) * up(n))) with n = pre_norm(sc); sc is the previous step's
  soft embedding softmax(logits) @ E * sqrt(d), zeros at a canvas's first step (which makes the
  MLP term exactly 0, so rows with and without a signal batch together).

Attention runs through an AttentionContext (`attend(layer, q, k, v)`, model/transformer.py's
protocol); DiffusionGemma's contexts are this module's GemmaCache (reference) and
engine/uniform_batch.py's paged pool, both built on `gemma_mask` and `gemma_attention` here, so
the two cannot disagree on who sees what. Tensor parallelism: the loader reads each rank's
slice (whole heads, half the dense MLP, whole experts: model/loaders/tp.py's plan) and with
`net.tp_group` set the three partial outputs (o_proj, the dense MLP's down, the experts) are
all-reduced before their post-norms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary
from model.config import ModelConfig
from model.moe import expert_ffn, expert_ffn_reference

SLIDING, GLOBAL = "sliding_attention", "full_attention"
EXTRA_KEY = "diffusion_gemma"


@dataclass(frozen=True)
class GemmaShape:
    """The parts of DiffusionGemma's text config that ModelConfig has no field for (kept in
    cfg.extra["diffusion_gemma"], so a ModelConfig round-trips through JSON)."""

    layer_types: tuple[str, ...]
    sliding_window: int
    head_dim: int  # sliding layers
    global_head_dim: int
    n_kv_heads: int  # sliding layers
    n_global_kv_heads: int
    intermediate: int  # the dense MLP (and the self-conditioning block)
    n_experts: int
    top_k: int
    moe_intermediate: int
    rope_sliding: tuple[float, float] = (10_000.0, 1.0)  # (theta, partial rotary factor)
    rope_global: tuple[float, float] = (1_000_000.0, 0.25)
    softcap: float = 30.0
    canvas_length: int = 256
    image_token_id: int | None = None

    @classmethod
    def from_cfg(cls, cfg: ModelConfig) -> GemmaShape:
        d = dict(cfg.extra[EXTRA_KEY])
        d["layer_types"] = tuple(d["layer_types"])
        d["rope_sliding"] = tuple(d["rope_sliding"])
        d["rope_global"] = tuple(d["rope_global"])
        return cls(**d)

    def to_extra(self) -> dict:
        return asdict(self)

    def layer_dims(self, i: int) -> tuple[int, int]:
        """(K/V heads, head_dim) of layer i."""
        if self.layer_types[i] == SLIDING:
            return self.n_kv_heads, self.head_dim
        return self.n_global_kv_heads, self.global_head_dim

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_types[i] == SLIDING else None


# --- attention: who sees what, once ---------------------------------------------------------
def gemma_mask(window: int | None, causal: bool, cached: torch.Tensor, cached_lens: torch.Tensor,
               query_valid: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, Lq, S + Lq]: which keys each new query sees.

    cached [B, S]: cached slot j of row b holds a token (slot j = absolute position j);
    cached_lens [B]; query_valid [B, Lq]: the new tokens (at positions cached_lens + i).
    causal (encoder): a query sees cached keys and new keys up to itself, with a window only
    the W positions up to itself. Bidirectional (decoder): all new keys and all cached ones, with
    a window only the last W - 1 cached ones (the new keys are always seen)."""
    B, S = cached.shape
    Lq = query_valid.shape[1]
    dev = cached.device
    j = torch.arange(S, device=dev)
    i = torch.arange(Lq, device=dev)
    new = query_valid[:, None, :].expand(B, Lq, Lq)  # [B, Lq(query), Lq(key)]
    old = cached[:, None, :].expand(B, Lq, S)
    if causal:
        new = new & (i[None, :] <= i[:, None])[None]
        if window is not None:
            new = new & (i[:, None] - i[None, :] < window)[None]
            q_pos = cached_lens[:, None] + i[None, :]  # [B, Lq]
            old = old & (q_pos[:, :, None] - j[None, None, :] < window)
    elif window is not None:
        old = old & (cached_lens[:, None] - j[None, :] < window)[:, None, :]
    return torch.cat([old, new], dim=2)[:, None]


def gemma_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """Unscaled (scale 1.0) softmax attention; q [B, H, Lq, hd], k/v [B, Hkv, Lk, hd]. Rows whose
    query sees no key (padding) come out 0, never NaN."""
    if mask is not None:
        mask = mask | ~mask.any(-1, keepdim=True)  # padding queries: attend anything, ignored
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                          enable_gqa=q.shape[1] != k.shape[1])


def causal_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The causal encoder over an empty cache with every query valid: no mask tensor, SDPA's
    is_causal (the flash / memory-efficient kernels; a dense [L, L] mask costs O(L^2) memory,
    4 GB of bools at a 64k-token prompt). Only where the window does not cut (global layers,
    or prompts no longer than the window)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sliding_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """The causal sliding-window encoder over an empty cache with every query valid, a chunk of
    `window` queries at a time against the keys they can see: masks of [W, 2W - 1] instead of one
    [L, L] (O(L W) memory: at a 64k-token prompt and W = 1024, 128 MB of masks in all instead of
    4 GB at once). q [B, H, L, hd], k/v [B, Hkv, L, hd]."""
    L = q.shape[2]
    out = torch.empty_like(q)
    for i0 in range(0, L, window):
        i1 = min(L, i0 + window)
        k0 = max(0, i0 - window + 1)
        qi = torch.arange(i0, i1, device=q.device)[:, None]
        kj = torch.arange(k0, i1, device=q.device)[None, :]
        mask = (kj <= qi) & (qi - kj < window)  # [i1 - i0, i1 - k0]
        out[:, :, i0:i1] = F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, k0:i1], v[:, :, k0:i1], attn_mask=mask, scale=1.0,
            enable_gqa=q.shape[1] != k.shape[1])
    return out


class GemmaDense:
    """No cache: the call's own tokens, causal (encoder) or bidirectional (decoder); for tests."""

    def __init__(self, shape: GemmaShape, causal: bool, query_valid: torch.Tensor | None = None):
        self.shape, self.causal, self.query_valid = shape, causal, query_valid
        self._masks: dict = {}

    def attend(self, layer, q, k, v):
        B, _, Lq, _ = q.shape
        w = self.shape.window(layer)
        if w not in self._masks:
            qv = self.query_valid if self.query_valid is not None else \
                torch.ones(B, Lq, dtype=torch.bool, device=q.device)
            empty = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
            zeros = torch.zeros(B, dtype=torch.long, device=q.device)
            self._masks[w] = gemma_mask(w, self.causal, empty, zeros, qv)
        return gemma_attention(q, k, v, self._masks[w])


class GemmaCache:
    """A contiguous K/V cache of B rows with DiffusionGemma's per-layer shapes (the reference the
    engine's paged pool is tested against through the tokens).

        cache.context(causal=True)      # encoder: attend causally, append the valid new tokens
        cache.context()                 # decoder: read only"""

    def __init__(self, net: DiffusionGemma, batch: int, max_len: int, device=None,
                 dtype: torch.dtype | None = None):
        p = next(net.parameters())
        device = device if device is not None else p.device
        dtype = dtype or p.dtype
        self.shape, self.max_len = net.shape, max_len
        self.k = [torch.zeros(batch, h, max_len, d, device=device, dtype=dtype)
                  for h, d in net.kv_shapes]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_used = 0

    def context(self, causal: bool = False, query_valid: torch.Tensor | None = None) -> _CacheCtx:
        return _CacheCtx(self, causal, query_valid)


class _CacheCtx:
    def __init__(self, cache: GemmaCache, causal: bool, query_valid):
        self.cache, self.causal, self.query_valid = cache, causal, query_valid
        self._masks: dict = {}
        self._stored = 0

    def attend(self, layer, q, k, v):
        c = self.cache
        B, _, Lq, _ = q.shape
        S = c.max_used
        qv = self.query_valid if self.query_valid is not None else \
            torch.ones(B, Lq, dtype=torch.bool, device=q.device)
        w = c.shape.window(layer)
        if self.causal and S == 0 and self.query_valid is None:
            out = causal_prefill(q, k, v) if w is None or Lq <= w else sliding_prefill(q, k, v, w)
        else:
            if w not in self._masks:
                cached = torch.arange(S, device=q.device)[None, :] < c.lengths[:, None]
                self._masks[w] = gemma_mask(w, self.causal, cached, c.lengths, qv)
            k_all = torch.cat([c.k[layer][:, :, :S].to(k.dtype), k], dim=2)
            v_all = torch.cat([c.v[layer][:, :, :S].to(v.dtype), v], dim=2)
            out = gemma_attention(q, k_all, v_all, self._masks[w])
        if self.causal:  # the encoder writes what it encoded
            slot = c.lengths[:, None] + qv.long().cumsum(1) - 1  # [B, Lq]
            if bool((slot >= c.max_len).any()):
                raise RuntimeError(f"KV cache overflow: {c.max_len} slots")
            rows, cols = qv.nonzero(as_tuple=True)
            c.k[layer].transpose(1, 2)[rows, slot[rows, cols]] = \
                k.transpose(1, 2)[rows, cols].to(c.k[layer].dtype)
            c.v[layer].transpose(1, 2)[rows, slot[rows, cols]] = \
                v.transpose(1, 2)[rows, cols].to(c.v[layer].dtype)
            if layer == len(c.k) - 1:
                c.lengths += qv.sum(1)
                c.max_used = max(c.max_used, int(c.lengths.max()))
        return out


# --- the network ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma's RMSNorm in float32: x * (mean(x^2) + eps)^-1/2 * weight (weight used as is;
    `scale=False`: no weight, the v_norm / router / self-conditioning post-norm)."""

    def __init__(self, dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # kernels/rmsnorm.py: the same maths, fused


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # transformers' gelu_pytorch_tanh


def inv_frequencies(head_dim: int, theta: float, partial: float, proportional: bool) -> torch.Tensor:
    """[head_dim / 2] rotary inverse frequencies. Sliding layers: the default rotary over
    int(hd * partial) dims. Global ("proportional"): int(partial * hd / 2) frequencies of
    theta^(-2i / hd), padded with zeros to hd / 2 (those channel pairs stay unrotated)."""
    if not proportional:
        dim = int(head_dim * partial)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    n_rot = int(partial * head_dim // 2)
    rot = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rot, torch.zeros(head_dim // 2 - n_rot)])


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=group)
    return x


class GemmaAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int, hd: int, sliding: bool, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv, hd
        self.wq = nn.Linear(d, n_heads * hd, bias=False)
        self.wk = nn.Linear(d, n_kv * hd, bias=False)
        # global layers have no value projection: values are the keys before k_norm and rotary
        self.wv = nn.Linear(d, n_kv * hd, bias=False) if sliding else None
        self.wo = nn.Linear(n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, eps)
        self.k_norm = RMSNorm(hd, eps)
        self.v_norm = RMSNorm(hd, eps, scale=False)

    def forward(self, x, cos, sin, attn, layer: int, tp_group=None):
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_norm(self.wq(x).view(B, L, -1, hd)).transpose(1, 2)  # [B, H, L, hd]
        k_raw = self.wk(x).view(B, L, -1, hd)
        v = self.wv(x).view(B, L, -1, hd) if self.wv is not None else k_raw
        k = self.k_norm(k_raw).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rotary(q, k, cos, sin)  # cos/sin [B, 1, L, hd]: rotate_half over all hd
        v = self.v_norm(v).transpose(1, 2)
        out = attn.attend(layer, q, k, v)  # [B, H, L, hd]
        return _all_reduce(self.wo(out.transpose(1, 2).reshape(B, L, -1)), tp_group)


class GeGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d, bias=False)  # down

    def forward(self, x):
        return self.w2(_gelu(self.w1(x)) * self.w3(x))


class GemmaRouter(nn.Module):
    """DiffusionGemma's router (it differs from model/moe.py's softmax/sigmoid routers: a
    weight-free RMSNorm, a learned input scale, renormalised top-k, a per-expert output scale)."""

    def __init__(self, d: int, n_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.norm = RMSNorm(d, eps, scale=False)
        self.proj = nn.Linear(d, n_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(d))
        self.per_expert_scale = nn.Parameter(torch.ones(n_experts))
        self.root = d ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (expert ids [N, k], weights [N, k] float32)."""
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # [N, E]
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return idx, w * self.per_expert_scale[idx]


class GemmaFFN(nn.Module):
    """The dense GeGLU MLP (`shared`) and the routed experts of one layer, named as model/moe.py's
    MoE names its parts so the tensor-parallel plan (model/loaders/tp.py) applies unchanged: the
    dense MLP is split like a shared expert (column / row), the fused experts
    `w_gate_up` [E, 2I, d] (gate rows, then up rows) and `w_down` [E, d, I] by whole experts (this
    rank holds [expert_offset, expert_offset + n_local)). Their norms live in the layer."""

    def __init__(self, d: int, dense_hidden: int, n_experts: int, top_k: int, moe_hidden: int,
                 eps: float):
        super().__init__()
        self.shared = GeGLU(d, dense_hidden)
        self.router = GemmaRouter(d, n_experts, top_k, eps)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * moe_hidden, d))
        self.w_down = nn.Parameter(torch.empty(n_experts, d, moe_hidden))
        self.n_local, self.expert_offset = n_experts, 0
        self.impl = "auto"  # model/moe.expert_ffn's path; "reference" = its per-expert loop

    def experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, d], idx/w [N, k] (global expert ids) -> [N, d]: this rank's experts' share."""
        if self.impl == "reference":
            return expert_ffn_reference(x, idx, w, self.w_gate_up, self.w_down, act="gelu_tanh",
                                        expert_offset=self.expert_offset)
        return expert_ffn(x, idx, w, self.w_gate_up, self.w_down, act="gelu_tanh",
                          expert_offset=self.expert_offset, impl=self.impl)


class GemmaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: GemmaShape, i: int):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        n_kv, hd = shape.layer_dims(i)
        sliding = shape.layer_types[i] == SLIDING
        self.attn_norm = RMSNorm(d, eps)
        self.attn = GemmaAttention(d, cfg.n_heads, n_kv, hd, sliding, eps)
        self.post_attn_norm = RMSNorm(d, eps)
        self.mlp_norm = RMSNorm(d, eps)
        self.post_mlp_norm = RMSNorm(d, eps)
        self.moe_norm = RMSNorm(d, eps)
        self.post_moe_norm = RMSNorm(d, eps)
        self.post_ffn_norm = RMSNorm(d, eps)
        self.mlp = GemmaFFN(d, shape.intermediate, shape.n_experts, shape.top_k,
                            shape.moe_intermediate, eps)
        # the one weight the encoder does not share with the decoder
        self.dec_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.enc_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, cos, sin, attn, layer: int, encoder: bool, ffn: bool = True,
                tp_group=None):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, attn, layer, tp_group))
        if not ffn:  # the encoder's last layer: its K/V are written, its output is unread
            return x
        B, L, d = x.shape
        dense = self.post_mlp_norm(_all_reduce(self.mlp.shared(self.mlp_norm(x)), tp_group))
        flat = x.reshape(-1, d)  # [B*L, d]
        idx, w = self.mlp.router(flat)  # routed on the residual, before the MoE pre-norm
        moe = self.mlp.experts(self.moe_norm(flat), idx, w)  # [B*L, d]
        moe = self.post_moe_norm(_all_reduce(moe, tp_group).reshape(B, L, d))
        x = x + self.post_ffn_norm(dense + moe)
        return x * (self.enc_scalar if encoder else self.dec_scalar)


class SelfConditioning(nn.Module):
    """post_norm(embed + down(gelu(gate(n)) * up(n))), n = pre_norm(previous soft embedding)."""

    def __init__(self, d: int, hidden: int, eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(d, eps)
        self.mlp = GeGLU(d, hidden)
        self.post_norm = RMSNorm(d, eps, scale=False)

    def forward(self, embed: torch.Tensor, signal: torch.Tensor | None) -> torch.Tensor:
        if signal is None:  # a canvas's first step: the MLP of zeros is exactly zero
            return self.post_norm(embed)
        return self.post_norm(embed + self.mlp(self.pre_norm(signal.to(embed.dtype))))


class DiffusionGemma(nn.Module):
    """The text network (module docstring). cfg: a ModelConfig whose extra carries GemmaShape."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.shape = shape = GemmaShape.from_cfg(cfg)
        self.tp_size = 1  # the loader builds full shapes on the meta device and loads a slice
        self.tp_group = None  # the process group of the ranks (None: one device)
        d = cfg.d_model
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(GemmaLayer(cfg, shape, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.self_cond = SelfConditioning(d, shape.intermediate, cfg.norm_eps)
        self.windows = [shape.window(i) for i in range(cfg.n_layers)]
        for t in (SLIDING, GLOBAL):
            self.register_buffer(f"inv_freq_{t}", self._inv_freq(t), persistent=False)

    def _inv_freq(self, t: str, device=None) -> torch.Tensor:
        s = self.shape
        theta, partial = s.rope_sliding if t == SLIDING else s.rope_global
        hd = s.head_dim if t == SLIDING else s.global_head_dim
        return inv_frequencies(hd, theta, partial, t == GLOBAL).to(device)

    def reset_buffers(self, device) -> None:
        """Recompute the rotary tables on `device` (a net built on the meta device has none)."""
        for t in (SLIDING, GLOBAL):
            setattr(self, f"inv_freq_{t}", self._inv_freq(t, device))

    @property
    def kv_shapes(self) -> list[tuple[int, int]]:
        """(K/V heads on this rank, head_dim) per layer: what a cache allocates."""
        return [(layer.attn.n_kv_heads, layer.attn.head_dim) for layer in self.layers]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.tok_embeddings.weight
        return F.embedding(ids, w) * torch.tensor(self.cfg.d_model ** 0.5, dtype=w.dtype)

    def _rotary(self, positions: torch.Tensor, dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        """positions [B, L] -> per layer type (cos, sin) [B, 1, L, hd] in `dtype`."""
        out = {}
        for t in (SLIDING, GLOBAL):
            freqs = positions.float()[..., None] * getattr(self, f"inv_freq_{t}").float()
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]
            out[t] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def _layers(self, x, positions, attn, encoder: bool, full_last: bool = True):
        rot = self._rotary(positions, x.dtype)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            cos, sin = rot[self.shape.layer_types[i]]
            x = layer(x, cos, sin, attn, i, encoder, ffn=full_last or i < n - 1,
                      tp_group=self.tp_group)
        return x

    def encode(self, ids: torch.Tensor, positions: torch.Tensor, attn,
               return_hidden: bool = False) -> torch.Tensor | None:
        """Causal encoder over ids [B, L] at positions [B, L]; attn writes the K/V (a causal
        cache context). return_hidden: the final-normed hidden states [B, L, d] (tests)."""
        x = self._layers(self._embed(ids), positions, attn, encoder=True, full_last=return_hidden)
        return self.norm(x) if return_hidden else None

    def denoise(self, canvas: torch.Tensor, positions: torch.Tensor, attn,
                self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional decoder over canvas [B, C] at positions [B, C], reading the cache through
        attn; self_cond [B, C, d] the previous step's soft embedding (None or zeros at a canvas's
        first step). -> soft-capped float32 logits [B, C, V]."""
        x = self.self_cond(self._embed(canvas), self_cond)
        x = self.norm(self._layers(x, positions, attn, encoder=False))
        logits = F.linear(x, self.tok_embeddings.weight).float()
        cap = self.shape.softcap
        return torch.tanh(logits / cap) * cap

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """The self-conditioning state a step leaves for the next: logits [B, C, V] (the
        temperature-scaled ones the sampler used) -> softmax @ E * sqrt(d), [B, C, d], with
        transformers' casts (logits and probabilities in the embedding dtype)."""
        w = self.tok_embeddings.weight
        probs = torch.softmax(logits.to(w.dtype), dim=-1, dtype=torch.float32).to(w.dtype)
        return (probs @ w) * torch.tensor(self.cfg.d_model ** 0.5, dtype=w.dtype)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random weights for tests and benchmarks (norm weights 1, scalars 1)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "scalar" in name or name.endswith("scale"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)


def gemma_config(name: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 shape: GemmaShape, *, norm_eps: float = 1e-6, max_seq_len: int = 131072,
                 eos_id: int = 1, pad_id: int = 0, eot_id: int | None = None,
                 extra: dict | None = None) -> ModelConfig:
    """A ModelConfig for DiffusionGemma: block-causal layout with the canvas as the block, no
    mask token (mask_id -1: uniform diffusion has none)."""
    if d_model % n_heads:  # ModelConfig checks it; DiffusionGemma's head_dim is its own field
        raise ValueError(f"hidden size {d_model} not divisible by {n_heads} heads")
    return ModelConfig(
        name=name, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=math.gcd(n_heads, shape.n_kv_heads), mlp_hidden=shape.intermediate,
        norm_eps=norm_eps, max_seq_len=max_seq_len, mask_id=-1, eos_id=eos_id, pad_id=pad_id,
        eot_id=eot_id, attention="block_causal", block_length=shape.canvas_length,
        time_conditioning=False, default_steps_per_block=48,
        # the LM head IS the embedding (denoise uses it); there is no lm_head parameter to tie
        tie_embeddings=False,
        extra={"family": "diffusion_gemma", EXTRA_KEY: shape.to_extra(), **(extra or {})})
