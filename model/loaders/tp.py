"""Which slice of each parameter a tensor-parallel rank holds, decided by our module names.

    dim = split_dim("layers.0.attn.wq.weight")        # 0: column-parallel (output rows)
    part = shard(name, full_tensor, rank, world)      # this rank's slice (a view)
    sl = slices(name, stored_shape, rank, world)      # the same cut as an index, for safetensors
                                                      # get_slice: read only the slice from disk

The Megatron / gpt-fast plan: q, k, v, gate, up (and GPT-2/DiT's fc) are column-parallel, split
along their output features, so each rank owns whole heads (heads are contiguous rows of wq/wk/wv)
and a slice of the MLP hidden units; the output projections wo, down (w2) and GPT-2/DiT's proj are
row-parallel, split along their input features, and their partial outputs are summed by an
all-reduce after the layer (model/parallel.py adds it). Embeddings, norms, adaLN and the LM head
stay whole on every rank.

Mixture-of-experts layers (model/moe.py) are expert-parallel: the fused expert tensors
`mlp.w_gate_up` [E, 2I, d] and `mlp.w_down` [E, d, I] are split along the expert dimension, so
rank r holds whole experts [r*E/n, (r+1)*E/n); the router (`mlp.gate`, `mlp.expert_bias`) stays
whole, every rank routes every token and computes the pairs routed to its experts, and one
all-reduce after the MoE sums the ranks' parts (model/parallel.py). Whole experts rather than a
column/row split of each: the experts are narrow (LLaDA2.0-mini: 256 of width 512), an 8-way
split would leave 64-column GEMMs, while whole ones keep their full width and the same single
all-reduce. The shared expert (`mlp.shared.w1/w3/w2`) is split like a dense MLP.
With more ranks than KV heads (a multiple of them), `replicate_kv_heads` repeats each KV head at
load so every rank holds the one its query heads read (exact; vLLM and SGLang do the same).
A row-parallel bias would be added once per rank before the sum, so
only rank 0 keeps it and the others hold zeros: the all-reduced output is exact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

COLUMN = ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3", "mlp.fc", "mlp.shared.w1",
          "mlp.shared.w3")
ROW = ("attn.wo", "mlp.w2", "mlp.proj", "mlp.shared.w2")
EXPERTS = ("w_gate_up", "w_down")  # parameters of the module "mlp" (a MoE), split by expert


def _module_of(name: str) -> tuple[str, str]:
    """'layers.3.attn.wq.weight' -> ('attn.wq', 'weight')."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        return "", parts[-1]
    return ".".join(parts[2:-1]), parts[-1]


def split_dim(name: str) -> int | None:
    """Dimension this parameter is split along under TP, or None if replicated."""
    mod, kind = _module_of(name)
    if mod in COLUMN or (mod == "mlp" and kind in EXPERTS):
        return 0
    if mod in ROW and kind == "weight":
        return 1
    return None


def is_row_bias(name: str) -> bool:
    mod, kind = _module_of(name)
    return mod in ROW and kind == "bias"


def _bounds(n: int, rank: int, world: int, name: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{name}: {n} features do not split evenly over {world} ranks")
    step = n // world
    return rank * step, (rank + 1) * step


def slices(name: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[slice, ...] | None:
    """Index selecting this rank's part of a tensor of `shape`; None = whole, or rank-dependent
    content that is not a slice (the zeroed row-parallel bias)."""
    if world == 1:
        return tuple(slice(None) for _ in shape)
    if is_row_bias(name):
        return None
    dim = split_dim(name)
    if dim is None:
        return tuple(slice(None) for _ in shape)
    lo, hi = _bounds(shape[dim], rank, world, name)
    return tuple(slice(lo, hi) if d == dim else slice(None) for d in range(len(shape)))


def shard(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of the full tensor `t` (works on meta tensors, for expected shapes)."""
    if world == 1:
        return t
    if is_row_bias(name):
        return t if rank == 0 else torch.zeros_like(t)
    return t[slices(name, tuple(t.shape), rank, world)]


def check_divisible(n_heads: int, n_kv_heads: int, mlp_hidden: int, world: int) -> None:
    for what, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("mlp_hidden", mlp_hidden)):
        if n % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {what} ({n}) "
                             f"divisible by {world}")


def replicate_kv_heads(cfg, world: int, map_tensor):
    """When `world` ranks exceed the KV heads (and are a multiple of them), repeat each KV head
    world / n_kv_heads times in wk / wv (cfg.n_kv_heads becomes world, in place) and return the
    map_tensor that does it, so each rank holds one. Exact: query head h reads KV head
    h // (H / n_kv); after repeat_interleave by r it reads h // (H / (r n_kv)), the same head's
    copy. The KV cache per rank is one head. Otherwise map_tensor is returned unchanged."""
    n_kv = cfg.n_kv_heads
    if world <= n_kv or world % n_kv or cfg.n_heads % world:
        return map_tensor
    r, hd = world // n_kv, cfg.head_dim
    stored = copy.copy(cfg)  # what the checkpoint holds: format maps read its head counts
    cfg.n_kv_heads = world

    def repeat(then):
        def f(t: torch.Tensor) -> torch.Tensor:
            t = then(t) if then is not None else t
            rest = t.shape[1:]
            return t.reshape(n_kv, hd, *rest).repeat_interleave(r, 0).reshape(n_kv * r * hd, *rest)
        return f

    def mapped(key, c):
        targets = map_tensor(key, stored)
        if not targets:
            return targets
        out = []
        for tg in targets:
            mod, _ = _module_of(tg.name)
            out.append(type(tg)(tg.name, repeat(tg.transform), tg.expert, tg.rows)
                       if mod in ("attn.wk", "attn.wv") else tg)
        return out

    return mapped


def check_experts_divisible(n_experts: int, shared_hidden: int, world: int) -> None:
    """Expert parallelism needs whole experts per rank and an even split of the shared expert."""
    if n_experts % world:
        raise ValueError(f"expert parallelism over {world} ranks needs n_experts ({n_experts}) "
                         f"divisible by {world}")
    if shared_hidden % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs the shared expert's "
                         f"width ({shared_hidden}) divisible by {world}")


def finish_sharded_modules(net: nn.Module, world: int, rank: int = 0) -> None:
    """After loading slices: make module attributes describe the local shapes (heads per rank,
    Linear in/out features), as model/parallel.apply_tp leaves them."""
    if world == 1:
        return
    for mod in net.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        if hasattr(mod, "n_heads") and hasattr(mod, "n_kv_heads") and hasattr(mod, "head_dim"):
            mod.n_heads = mod.wq.weight.shape[0] // mod.head_dim
            mod.n_kv_heads = mod.wk.weight.shape[0] // mod.head_dim
        if hasattr(mod, "w_gate_up") and hasattr(mod, "n_local"):  # a MoE: experts held here
            mod.n_local = mod.w_gate_up.shape[0]
            mod.expert_offset = rank * mod.n_local
