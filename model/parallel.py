"""Tensor parallelism as a transform of a model that knows nothing of it (gpt-fast style).

    apply_tp(net, rank, world_size)                       # shard a built model in place
    net, tok, cfg = load_sharded(dir, rank, world_size)   # each rank reads only its slices
    net = load_sharded_state(cfg, state, rank, world_size)  # same, from a state dict / slices
    logits = tp_forward(source, input_ids, tensor_parallel=2)            # CPU: gloo, 2 processes
    result = tp_generate(source, prompt_ids, params, tensor_parallel=2)  # rank 0's result

Sharding (Megatron's split, the plan in model/loaders/tp.py): wq/wk/wv and the MLP's w1/w3
(gate/up, or GPT-2's fc) are column-parallel, so each rank owns whole heads and a slice of the
hidden units; wo and w2 (or proj) are row-parallel and followed by an all-reduce added as a
forward hook: two all-reduces per block, and the residual stream stays replicated. A
mixture-of-experts MLP is expert-parallel (each rank whole experts, the router replicated, one
all-reduce on the MoE's output; model/loaders/tp.py says why). Head counts
are divided on the Attention modules (the forward reshapes with -1 heads, so it needs no change).
Embeddings, norms, adaLN and the time embedding are replicated; the LM head too, unless
`vocab_parallel=True` splits it by vocabulary rows and all-gathers the logits (saves V*d weights
per rank, 1 GB of bf16 for LLaDA-8B; costs one all-gather of [B, L, V] per step). A row-parallel
bias (GPT-2) is kept on rank 0 only, zeros elsewhere, so the all-reduce adds it once.

apply_tp slices weights that are still full and leaves alone those a loader already sliced
(model/loaders reads only a rank's slice from disk with tp_rank/tp_size), so
load_pretrained(..., tp_rank, tp_size) followed by apply_tp is the no-full-copy path for every
checkpoint format. `net.cfg` becomes a ShardConfig: per-rank n_heads / n_kv_heads / mlp_hidden
(what KV caches are sized from), head_dim of the full model.

Every rank runs the same forward on the same inputs and gets bit-identical outputs (an
all-reduce returns the same bits everywhere), so every rank running model/sampling.generate()
with the same params and seed stays in lockstep with no other communication; rank 0 reports.
`run_tp` is the multi-process runner: torch.multiprocessing spawn, gloo on CPU, NCCL on GPUs
(rank r on cuda:r). A Ray replica would instead call `init_distributed` and `load_sharded` in
each of its rank actors and drive the same step on all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.loaders import load_pretrained
from model.loaders import tp as plan
from model.moe import MoE
from model.sampling import generate
from model.transformer import Attention, DiffusionTransformer

log = logging.getLogger(__name__)


@dataclass
class ShardConfig(ModelConfig):
    """A rank's view of the model: per-rank head counts and MLP width; the full head_dim."""

    tp_rank: int = 0
    tp_size: int = 1

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // (self.n_heads * self.tp_size)


def shard_config(cfg: ModelConfig, rank: int, world_size: int) -> ShardConfig:
    base = unshard_config(cfg)
    check_shardable(base, world_size)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(n_heads=base.n_heads // world_size, n_kv_heads=base.n_kv_heads // world_size,
                  mlp_hidden=base.mlp_hidden // world_size)
    return ShardConfig(**fields, tp_rank=rank, tp_size=world_size)


def unshard_config(cfg: ModelConfig) -> ModelConfig:
    """The full model's config (identity for a plain ModelConfig)."""
    if not isinstance(cfg, ShardConfig):
        return cfg
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(n_heads=cfg.n_heads * cfg.tp_size, n_kv_heads=cfg.n_kv_heads * cfg.tp_size,
                  mlp_hidden=cfg.mlp_hidden * cfg.tp_size)
    return ModelConfig(**fields)


def check_shardable(cfg: ModelConfig, world_size: int, vocab_parallel: bool = False) -> None:
    plan.check_divisible(cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden, world_size)
    if cfg.n_experts:
        plan.check_experts_divisible(cfg.n_experts, cfg.shared_expert_hidden, world_size)
    if vocab_parallel and cfg.vocab_size % world_size:
        raise ValueError(f"vocab-parallel LM head needs vocab_size ({cfg.vocab_size}) "
                         f"divisible by {world_size}")


def _take(t, name: str, rank: int, world_size: int, vocab_parallel: bool):
    """This rank's part of parameter `name` from a full tensor or a lazy safetensors slice
    (which then reads only those bytes)."""
    lazy = not isinstance(t, torch.Tensor)
    shape = tuple(t.get_shape()) if lazy else tuple(t.shape)
    if vocab_parallel and name == "lm_head.weight":
        n = shape[0] // world_size
        return t[rank * n:(rank + 1) * n] if lazy else t.narrow(0, rank * n, n)
    if lazy:
        idx = plan.slices(name, shape, rank, world_size)
        if idx is not None:
            return t[idx]
        t = t[:]
    return plan.shard(name, t, rank, world_size)


# --- collectives as hooks ---------------------------------------------------------------------

def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    # functional collectives trace under torch.compile / CUDA graphs; plain c10d otherwise
    try:
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(t, "sum", group or dist.group.WORLD)
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        dist.all_reduce(t, group=group)
        return t


def _all_gather_last(t: torch.Tensor, world_size: int, group) -> torch.Tensor:
    # [..., V/ws] on every rank -> [..., V] on every rank
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _reduce_hook(group):
    def hook(module, inputs, output):
        return _all_reduce(output, group)

    return hook


def _gather_hook(world_size: int, group):
    def hook(module, inputs, output):
        return _all_gather_last(output, world_size, group)

    return hook


# --- apply_tp ---------------------------------------------------------------------------------

def apply_tp(model: DiffusionTransformer, rank: int | None = None, world_size: int | None = None,
             group=None, *, vocab_parallel: bool = False) -> DiffusionTransformer:
    """Make `model` rank `rank`'s shard of a `world_size`-way tensor-parallel model, in place.

    Full weights are sliced (each rank keeps a copy of its slice, so the full tensors can be
    freed); weights a loader already sliced are kept. Works on meta tensors too. rank and
    world_size default to the process group's; world_size 1 changes nothing."""
    if rank is None or world_size is None:
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size == 1:
        return model
    if isinstance(model.cfg, ShardConfig):
        raise ValueError("apply_tp was already applied to this model")
    cfg = model.cfg
    check_shardable(cfg, world_size, vocab_parallel)
    tied = model.lm_head.weight is model.tok_embeddings.weight
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            if isinstance(module, MoE):  # expert parallel (model/loaders/tp.py)
                _shard_experts(module, rank, world_size)
                module.register_forward_hook(_reduce_hook(group))
            if isinstance(module, Attention):
                module.n_heads = cfg.n_heads // world_size
                module.n_kv_heads = cfg.n_kv_heads // world_size
            continue
        vocab = vocab_parallel and mod_name == "lm_head"
        dim = 0 if vocab else plan.split_dim(f"{mod_name}.weight")
        if dim is None:
            continue
        _shard_linear(module, mod_name, dim, rank, world_size, vocab, cfg)
        if vocab:
            module.register_forward_hook(_gather_hook(world_size, group))
        elif dim == 1 and ".mlp.shared." not in f".{mod_name}":
            # row-parallel: partial sums (a MoE's shared expert is summed with its experts'
            # part by the one all-reduce on the MoE's output)
            module.register_forward_hook(_reduce_hook(group))
    if tied and not vocab_parallel:
        model.lm_head.weight = model.tok_embeddings.weight
    model.cfg = shard_config(cfg, rank, world_size)
    model.tp_vocab_parallel = vocab_parallel  # the LM head then has a collective (its gather)
    return model


def _full_features(mod_name: str, cfg: ModelConfig) -> int:
    """Size of the split dimension of Linear `mod_name` in the full model."""
    leaf = mod_name.rsplit(".", 1)[-1]
    if ".shared." in mod_name:
        return cfg.shared_expert_hidden
    if leaf in ("wq", "wo"):
        return cfg.n_heads * cfg.head_dim
    if leaf in ("wk", "wv"):
        return cfg.n_kv_heads * cfg.head_dim
    if leaf == "lm_head":
        return cfg.vocab_size
    return cfg.mlp_hidden  # w1, w3, w2; GPT-2's fc, proj


def _shard_experts(moe: MoE, rank: int, world_size: int) -> None:
    """Keep experts [rank*E/n, (rank+1)*E/n) of a MoE (unless a loader kept only those)."""
    n_local = moe.n_experts // world_size
    for leaf in plan.EXPERTS:
        p = getattr(moe, leaf)
        if p.shape[0] == moe.n_experts:
            setattr(moe, leaf, nn.Parameter(p.data.narrow(0, rank * n_local, n_local).clone(),
                                            requires_grad=p.requires_grad))
        elif p.shape[0] != n_local:
            raise ValueError(f"MoE {leaf}: {p.shape[0]} experts, expected {moe.n_experts} "
                             f"(full) or {n_local} (this rank's)")
    moe.n_local, moe.expert_offset = n_local, rank * n_local


def _shard_linear(linear: nn.Linear, name: str, dim: int, rank: int, world_size: int,
                  vocab: bool, cfg: ModelConfig) -> None:
    size, full = linear.weight.shape[dim], _full_features(name, cfg)
    if size == full // world_size:
        return  # a loader read only this rank's slice (and zeroed its row bias) already
    if size != full:
        raise ValueError(f"{name}: {size} features along dim {dim}, expected {full} (full) or "
                         f"{full // world_size} (this rank's slice)")
    for leaf in ("weight", "bias"):
        p = getattr(linear, leaf)
        if p is None:
            continue
        new = _take(p.data, f"{name}.{leaf}", rank, world_size, vocab)
        # clone: keep only this rank's bytes alive once the full tensor is dropped
        setattr(linear, leaf, nn.Parameter(new.clone(), requires_grad=p.requires_grad))
    linear.out_features, linear.in_features = linear.weight.shape


# --- loading per-rank slices ------------------------------------------------------------------

def load_sharded(path_or_preset, rank: int, world_size: int, *, group=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 vocab_parallel: bool = False, rope_scaling: dict | None = None,
                 max_model_len: int | None = None):
    """Any checkpoint model/loaders reads (published formats, ours, "tiny-coder"), sliced per
    rank on the way from disk, then wired for TP. -> (net, tokenizer, full ModelConfig).
    rope_scaling / max_model_len: the deploy-time context overrides, the same on every rank."""
    net, tok, cfg = load_pretrained(path_or_preset, device=device, dtype=dtype, tp_rank=rank,
                                    tp_size=world_size, progress=rank == 0,
                                    rope_scaling=rope_scaling, max_model_len=max_model_len)
    return apply_tp(net, rank, world_size, group, vocab_parallel=vocab_parallel), tok, cfg


def load_sharded_state(cfg: ModelConfig, state: Mapping[str, Any], rank: int, world_size: int,
                       *, group=None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32,
                       vocab_parallel: bool = False) -> DiffusionTransformer:
    """Rank `rank`'s shard from a full state dict in our parameter names, whose values are
    tensors or lazy safetensors slices (safe_open(...).get_slice(name)): the model is built on
    the meta device, each parameter's slice taken, converted and assigned, so no rank ever holds
    the full model. A tied LM head may be absent from `state`."""
    with torch.device("meta"):
        net = DiffusionTransformer(cfg, init_weights=False)
    apply_tp(net, rank, world_size, group, vocab_parallel=vocab_parallel)
    tied = cfg.tie_embeddings
    out = {}
    for name, meta in net.state_dict(keep_vars=True).items():
        src = "tok_embeddings.weight" if name == "lm_head.weight" and name not in state else name
        t = _take(state[src], name, rank, world_size, vocab_parallel)
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"{name}: slice {tuple(t.shape)} != expected {tuple(meta.shape)}")
        out[name] = t
    net.load_state_dict(out, strict=True, assign=True)
    if tied and not vocab_parallel:
        net.lm_head.weight = net.tok_embeddings.weight
    return net.eval()


# --- processes --------------------------------------------------------------------------------

def init_distributed(rank: int, world_size: int, init_method: str,
                     device: str = "cpu", timeout_s: float | None = None) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this rank's device.
    timeout_s bounds how long a collective waits for a rank that went away (torch's default
    is 10-30 minutes); a rank actor uses it so a dead peer fails the step instead of hanging."""
    import datetime

    if device.startswith("cuda"):
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            **kw)
    return dev


def _rank_main(rank: int, world_size: int, worker: Callable, args: tuple, tmp: str,
               device: str, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if rank:  # one voice: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    dev = init_distributed(rank, world_size, f"file://{tmp}/rendezvous", device)
    try:
        result = worker(rank, world_size, dev, *args)
        if rank == 0:
            with open(os.path.join(tmp, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
        # Tear down together: a rank destroying its gloo group while its peer still has a
        # collective in flight aborted the process once in CI ("terminate called without an
        # active exception"). A rank that failed never gets here; mp.spawn then ends the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished rank leaves without the interpreter's teardown: rank 0 of a passing 2-rank
    # run still aborted there twice in CI, after the barrier ("terminate called without an
    # active exception": a C++ thread met its destructor at exit). Its result is on disk and
    # mp.spawn reads only the exit code; a rank that raised never gets here.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def run_tp(worker: Callable, world_size: int, *args, device: str = "cpu",
           threads_per_rank: int | None = None) -> Any:
    """Run worker(rank, world_size, device, *args) in `world_size` spawned processes joined in a
    process group; return rank 0's return value. `worker` must be importable (module level).
    A failure on any rank raises here with that rank's traceback."""
    import torch.multiprocessing as mp

    if threads_per_rank is None and not device.startswith("cuda"):
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)  # no oversubscription
    with tempfile.TemporaryDirectory(prefix="dllm-tp-") as tmp:
        mp.spawn(_rank_main, args=(world_size, worker, args, tmp, device, threads_per_rank),
                 nprocs=world_size, join=True)
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)


# --- what a rank builds -----------------------------------------------------------------------

def _is_checkpoint(source) -> bool:
    """A directory, or "tiny-coder" when its weights are there: model/loaders reads it."""
    if isinstance(source, ModelConfig):
        return False
    if Path(source).is_dir():
        return True
    if str(source) == "tiny-coder":
        from model.checkpoint import EMBEDDED_DIR

        return (EMBEDDED_DIR / "config.json").exists()
    return False


def build_rank_model(source, rank: int, world_size: int, device, *,
                     dtype: torch.dtype = torch.float32, seed: int = 0,
                     vocab_parallel: bool = False) -> DiffusionTransformer:
    """`source`: a checkpoint directory or "tiny-coder" (sliced from disk), or a preset name /
    ModelConfig with random weights from `seed` (the same full weights on every rank, so TP=N
    equals TP=1; built in full then sliced: for tests and benchmarks)."""
    if _is_checkpoint(source):
        return load_sharded(source, rank, world_size, device=device, dtype=dtype,
                            vocab_parallel=vocab_parallel)[0]
    cfg = source if isinstance(source, ModelConfig) else ModelConfig.from_name(str(source))
    torch.manual_seed(seed)
    net = DiffusionTransformer(cfg).to(dtype)
    return apply_tp(net, rank, world_size, vocab_parallel=vocab_parallel).to(device).eval()


def _forward_worker(rank, world_size, device, source, input_ids, forward_kwargs, build_kwargs):
    net = build_rank_model(source, rank, world_size, device, **build_kwargs)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
          for k, v in forward_kwargs.items()}
    with torch.no_grad():
        logits = net(input_ids.to(device), **kw)
    return logits.float().cpu()


def tp_forward(source, input_ids: torch.Tensor, tensor_parallel: int = 2, *,
               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               vocab_parallel: bool = False, **forward_kwargs) -> torch.Tensor:
    """One forward of the model sharded over `tensor_parallel` processes -> rank 0's logits."""
    build = dict(dtype=dtype, seed=seed, vocab_parallel=vocab_parallel)
    return run_tp(_forward_worker, tensor_parallel, source, input_ids, forward_kwargs, build,
                  device=device)


def _generate_worker(rank, world_size, device, source, prompt_ids, params, gen_kwargs,
                     build_kwargs):
    net = build_rank_model(source, rank, world_size, device, **build_kwargs)
    return generate(net, prompt_ids, params, **gen_kwargs)


def tp_generate(source, prompt_ids: list[int], params, tensor_parallel: int = 2, *,
                suffix_ids: list[int] | None = None, tokenizer=None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0,
                vocab_parallel: bool = False):
    """model/sampling.generate on a model sharded over `tensor_parallel` processes; every rank
    runs the same steps and rank 0's GenerationResult is returned. `seed` only seeds random
    weights (params.seed keys the sampling noise)."""
    build = dict(dtype=dtype, seed=seed, vocab_parallel=vocab_parallel)
    gen = dict(suffix_ids=suffix_ids, tokenizer=tokenizer)
    return run_tp(_generate_worker, tensor_parallel, source, list(prompt_ids), params, gen,
                  build, device=device)

