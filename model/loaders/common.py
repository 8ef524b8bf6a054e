"""Shared loader machinery: weight files, headers, and streaming tensors onto a meta-built net.

    files = weight_files(directory)                  # model.safetensors, or the shards of an index
    shapes = read_shapes(files)                      # {stored name: shape}, headers only
    net = build_on_meta(cfg)                         # no parameter memory, no random init
    stream_weights(net, files, fmt.map_tensor, device="cuda", dtype=torch.bfloat16,
                   tp_rank=r, tp_size=n)             # one shard open at a time, one tensor at a time

A format module (llada.py, dream.py, ...) only says how a stored tensor name becomes our module
names (`map_tensor`, returning `Target`s with an optional transform for fused or transposed
storage), as a `NameMap` of tables: prefixes, whole-model names, per-layer names. Everything else
lives here: each tensor is read, transformed, cut to this rank's slice,
converted to the target dtype in the same copy that moves it to the device, and assigned in place
of the meta parameter, so peak host memory is one tensor, not one model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from model.config import ModelConfig
from model.loaders import tp
from model.transformer import DiffusionTransformer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """One of our parameters that a stored tensor fills (`transform` maps stored -> ours)."""

    name: str  # e.g. "layers.0.attn.wq.weight"
    transform: Transform | None = None
    # One expert's slice of a fused [E, ...] parameter (MoE checkpoints store experts one by
    # one): the stored tensor fills name[expert, rows[0]:rows[1]] (rows None: all of dim 1).
    expert: int | None = None
    rows: tuple[int, int] | None = None


# map_tensor(stored_name, cfg) -> targets; [] = known but not a parameter (rotary tables, causal
# mask buffers); None = unknown name (reported, and an error: a silent skip hides a wrong mapping).
MapTensor = Callable[[str, ModelConfig], "list[Target] | None"]


class FormatError(ValueError):
    """The checkpoint is not in a format (or a variant of one) that this loader reproduces."""


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def weight_files(directory: str | Path) -> list[Path]:
    """model.safetensors, or every shard named by model.safetensors.index.json (in index order)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(index)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))  # first-seen order, no duplicates
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return [directory / s for s in shards]
    single = directory / SINGLE_FILE
    if single.exists():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:  # e.g. a lone "model-00001-of-00001.safetensors" without an index
        return found
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise FormatError(f"{directory} holds pickle weights (.bin/.pt) only; they can run code "
                          "when loaded, so convert them to safetensors first")
    raise FileNotFoundError(f"no safetensors weights in {directory}")


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Stored tensor name -> shape, from the safetensors headers (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if p and name.startswith(p):
            return name[len(p):]
    return name


LAYER_RE = re.compile(r"^(?:layers|blocks|h)\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[int, str] | None:
    """'blocks.3.attn_out.weight' -> (3, 'attn_out.weight'); None if not a per-layer name."""
    m = LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


# A stored per-layer tensor's place in a NameMap: one of our names (relative to layers.{i}.),
# a Target (relative name + transform), or several Targets (a fused tensor split in parts).
LayerEntry = str | Target | tuple[Target, ...]


@dataclass(frozen=True)
class NameMap:
    """A format's tensor names as tables: a MapTensor (stored name -> our Targets) for every
    format whose stored names are a prefix, whole-model names and per-layer names.

        map_tensor = NameMap(prefixes=("model.",), top={"norm.weight": "norm.weight"},
                             layer={"self_attn.o_proj.weight": "attn.wo.weight"})

    A stored name loses the first matching prefix; then `dropped` names (buffers: rotary
    tables, causal masks) map to nothing, `top` names to one of ours, and per-layer names
    ("h.3.attn.c_proj.weight", "blocks.3..." or "layers.3...") to `layer[rest]` under
    "layers.3.". Anything else is unknown (None), so a wrong mapping fails the load. With
    `bias_needs_qkv_bias` a per-layer ".bias" is unknown unless cfg.qkv_bias (Llama/Qwen2
    names are the same with and without q/k/v biases)."""

    prefixes: tuple[str, ...]
    top: dict[str, str]
    layer: dict[str, LayerEntry]
    dropped: tuple[str, ...] = ()  # whole names after the prefix
    dropped_in_layer: tuple[str, ...] = ()  # names after "layers.{i}."
    bias_needs_qkv_bias: bool = False

    def __call__(self, key: str, cfg: ModelConfig) -> list[Target] | None:
        name = strip_prefix(key, self.prefixes)
        if name in self.dropped:
            return []
        if name in self.top:
            return [Target(self.top[name])]
        layer = split_layer(name)
        if layer is None:
            return None
        i, rest = layer
        if rest in self.dropped_in_layer:
            return []
        if self.bias_needs_qkv_bias and rest.endswith(".bias") and not cfg.qkv_bias:
            return None
        entry = self.layer.get(rest)
        if entry is None:
            return None
        if isinstance(entry, str):
            entry = Target(entry)
        parts = entry if isinstance(entry, tuple) else (entry,)
        return [Target(f"layers.{i}.{t.name}", t.transform) for t in parts]

    def shape(self, shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...] | None:
        """The stored shape of tensor `name` (given without prefix), or None if absent."""
        return next((v for k, v in shapes.items() if strip_prefix(k, self.prefixes) == name),
                    None)


def chunk(i: int, n: int, dim: int = 0, then: Transform | None = None) -> Transform:
    """Transform taking the i-th of n equal parts along `dim` (fused qkv storage)."""

    def f(t: torch.Tensor) -> torch.Tensor:
        part = t.chunk(n, dim=dim)[i]
        return then(part) if then is not None else part

    return f


def transpose(t: torch.Tensor) -> torch.Tensor:
    """GPT-2 Conv1D stores weight as [in, out]; nn.Linear wants [out, in]."""
    return t.t()


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def build_on_meta(cfg: ModelConfig) -> DiffusionTransformer:
    """The network with every parameter on the meta device: shapes only, nothing initialised."""
    with torch.device("meta"):
        return DiffusionTransformer(cfg, init_weights=False)


def _set_param(net: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = net.get_submodule(mod_name) if mod_name else net
    mod._parameters[pname] = nn.Parameter(value, requires_grad=False)


def stream_weights(net: DiffusionTransformer, files: list[Path], map_tensor: MapTensor, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   tp_rank: int = 0, tp_size: int = 1, desc: str = "loading",
                   progress: bool = True) -> None:
    """Fill `net`'s meta parameters from `files`, shard by shard (see the module docstring).

    Raises FormatError on unknown stored names, shape mismatches and parameters nobody filled."""
    cfg = net.cfg
    expected = {n: p for n, p in net.named_parameters(remove_duplicate=False)}
    tied = cfg.tie_embeddings
    if tied:  # one tensor fills both; whichever stored name carries it
        expected.pop("lm_head.weight", None)
    filled: set[str] = set()
    unknown: list[str] = []
    experts = _ExpertParts(expected, device, dtype, tp_rank, tp_size)
    n_tensors = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            n_tensors += len(list(sf.keys()))
    bar = tqdm(total=n_tensors, desc=desc, unit="tensor", disable=not progress or tp_rank != 0)
    for i, f in enumerate(files):
        bar.set_postfix_str(f"shard {i + 1}/{len(files)}")
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                bar.update(1)
                targets = map_tensor(key, cfg)
                if targets is None:
                    unknown.append(key)
                    continue
                for tgt in targets:
                    name = "tok_embeddings.weight" if tied and tgt.name == "lm_head.weight" \
                        else tgt.name
                    if name in filled:
                        continue  # tied copy stored twice (GPT-2 wte + lm_head)
                    if name not in expected:
                        raise FormatError(f"{key} maps to {name}, which the network does not have")
                    if tgt.expert is not None:
                        experts.fill(sf, key, tgt)
                        continue
                    value = _read(sf, key, tgt.transform, name, tp_rank, tp_size)
                    want = tuple(tp.shard(name, expected[name], tp_rank, tp_size).shape)
                    if tuple(value.shape) != want:
                        raise FormatError(f"{key} -> {name}: stored shape {tuple(value.shape)}, "
                                          f"network expects {want}")
                    _set_param(net, name, _to(value, device, dtype))
                    filled.add(name)
    bar.close()
    for name, value in experts.finished():
        _set_param(net, name, value)
        filled.add(name)
    if unknown:
        raise FormatError(f"{len(unknown)} stored tensors have no place in the network, "
                          f"e.g. {unknown[:5]}")
    missing = sorted(set(expected) - filled)
    if missing:
        raise FormatError(f"{len(missing)} parameters were not in the checkpoint, e.g. {missing[:5]}")
    if tied:
        net.lm_head.weight = net.tok_embeddings.weight
    tp.finish_sharded_modules(net, tp_size, tp_rank)


class _ExpertParts:
    """Fused expert parameters assembled from per-expert stored tensors (Target.expert): each
    rank allocates only its experts [rank*E/n, (rank+1)*E/n) (expert parallel, loaders/tp.py),
    skips the others unread, and checks that every row of every local expert was filled."""

    def __init__(self, expected: dict, device, dtype, rank: int, size: int):
        self.expected, self.device, self.dtype = expected, device, dtype
        self.rank, self.size = rank, size
        self.parts: dict[str, torch.Tensor] = {}
        self.covered: dict[str, torch.Tensor] = {}

    def fill(self, sf, key: str, tgt: Target) -> None:
        full = tuple(self.expected[tgt.name].shape)  # [E, rows, cols]
        n_local = full[0] // self.size
        j = tgt.expert - self.rank * n_local
        if not 0 <= j < n_local:
            return  # another rank's expert
        if tgt.name not in self.parts:
            self.parts[tgt.name] = torch.empty((n_local, *full[1:]), device=self.device,
                                               dtype=self.dtype)
            self.covered[tgt.name] = torch.zeros(n_local, full[1], dtype=torch.bool)
        t = sf.get_tensor(key)
        if tgt.transform is not None:
            t = tgt.transform(t.float())
        lo, hi = tgt.rows if tgt.rows is not None else (0, full[1])
        if tuple(t.shape) != (hi - lo, *full[2:]):
            raise FormatError(f"{key} -> {tgt.name}[{tgt.expert}, {lo}:{hi}]: stored shape "
                              f"{tuple(t.shape)}, network expects {(hi - lo, *full[2:])}")
        self.parts[tgt.name][j, lo:hi] = t.to(self.dtype)
        self.covered[tgt.name][j, lo:hi] = True

    def finished(self):
        for name, value in self.parts.items():
            missing = (~self.covered[name]).any(1).nonzero().flatten().tolist()
            if missing:
                off = self.rank * value.shape[0]
                raise FormatError(f"{name}: experts {[off + j for j in missing[:5]]} were not "
                                  "(fully) in the checkpoint")
            yield name, value


def _read(sf, key: str, transform: Transform | None, name: str, rank: int,
          size: int) -> torch.Tensor:
    if transform is None and size > 1:
        # Plain tensor: read only this rank's rows/columns from disk.
        sl = tp.slices(name, tuple(sf.get_slice(key).get_shape()), rank, size)
        if sl is not None:
            return sf.get_slice(key)[sl]
    t = sf.get_tensor(key)
    if transform is not None:
        t = transform(t.float() if t.is_floating_point() else t)  # arithmetic in fp32, cast once
    return tp.shard(name, t, rank, size)


def _to(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    src_ptr = t.untyped_storage().data_ptr()
    out = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if out.untyped_storage().data_ptr() == src_ptr:
        out = out.clone()  # a slice/view would pin the whole stored tensor in memory
    return out.contiguous()


@dataclass(frozen=True)
class Format:
    """A published checkpoint format: how its config.json and tensor names become ours.

    build_config(hf_config, shapes, raw_tokenizer) -> ModelConfig, with cfg.extra["family"] set;
    shapes are the stored tensors' (vocab and hidden sizes are read from them, since some
    checkpoints resized the embedding without updating config.json)."""

    family: str
    model_types: tuple[str, ...]
    tokenizer_fallback: str | None
    build_config: Callable[[dict, dict, object], ModelConfig]
    map_tensor: MapTensor
    # config.json `architectures` names that select this format before model_type does
    # (LLaDA-MoE says model_type "llada" like dense LLaDA: only its architecture tells them apart)
    architectures: tuple[str, ...] = ()


def token_id(raw_tok, token: str | None) -> int | None:
    """Id of `token` if the tokenizer has it as a single token, else None."""
    if raw_tok is None or not token:
        return None
    vocab = raw_tok.get_vocab()
    return int(vocab[token]) if token in vocab else None


def special_id(raw_tok, attr: str) -> int | None:
    """raw_tok.<attr>_token_id (mask, eos, pad, bos) or None."""
    if raw_tok is None:
        return None
    i = getattr(raw_tok, f"{attr}_token_id", None)
    return int(i) if i is not None else None


def rope_theta(hf: dict, default: float) -> float:
    """rope_theta from a transformers 4.x config or the 5.x `rope_parameters` dict (the scaling
    is read by checkpoint_rope)."""
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def checkpoint_rope(cfg: ModelConfig, hf: dict) -> None:
    """The rotary scaling and partial rotary of a published config.json, into cfg in place:
    `rope_scaling` (transformers 4.x) or a non-default `rope_parameters` (5.x), normalised by
    model/rope.py against the trained context cfg.max_seq_len; `partial_rotary_factor` at the
    top level or inside rope_parameters. A type model/rope.py does not reproduce is a
    FormatError (serving it with plain rotary would be silently wrong past the first tokens)."""
    from model.rope import normalise_rope_scaling

    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default"
                                          else None)
    factor = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if cfg.arch == "gpt2":  # learned positions: nothing to scale
        return
    if factor is not None and float(factor) > 0:  # some configs write -1 for "all dims"
        require(float(factor) <= 1.0, f"partial_rotary_factor {factor} > 1")
        cfg.partial_rotary_factor = float(factor)
    if scaling:
        try:
            cfg.rope_scaling = normalise_rope_scaling(scaling, cfg.max_seq_len)
        except ValueError as e:
            raise FormatError(str(e)) from None


def first(*values):
    """The first value that is not None (ids may be 0, so `or` will not do); lists -> first item."""
    for v in values:
        if isinstance(v, list | tuple):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None
