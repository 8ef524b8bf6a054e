"""LoRA adapters on a network that knows nothing of them: many resident, one per batch row.

    bank = apply_lora(net, max_loras=4, max_lora_rank=16)   # hooks on every Linear, empty slots
    slot = bank.acquire(adapter)          # resident (LRU; loads into a free or the least recently
                                          # used idle slot; None when every slot is in use)
    bank.set_rows([slot, -1, slot2])      # before a forward: row b's adapter slot (-1: none)
    logits = net(ids, ...)                # each row through its own adapter, one forward
    bank.release(slot)                    # the row finished; the slot stays resident until evicted
    with bank.using(slot): generate(net, ...)   # one adapter for every row (reference sampler)
    merge_adapter(net, adapter)           # or: fold one adapter into the weights (no hooks)

A transform in gpt-fast's manner, like model/parallel.apply_tp: `apply_lora` adds a forward hook
to every nn.Linear (prepended, so it runs before apply_tp's all-reduce hook) that adds the rows'
low-rank updates to the Linear's output through kernels/lora.add_lora, the gathered matmul of
Punica (one launch for the whole mixed batch). Per Linear the bank keeps stacks a [S, R, in] and
b [S, out, R] (S = max_loras slots, R = max_lora_rank): an adapter of rank r < R fills the
first r rows of A and columns of B, the rest stay zero; a module an adapter does not touch stays
zero in its slot. The LoRA scale (alpha / r, rsLoRA alpha / sqrt r) is folded into B when an
adapter is put in a slot. The row index lives in one persistent buffer, so a CUDA graph captured
over a forward replays with each step's rows (engine/cuda_graphs.py).

Tensor parallelism: slots hold this rank's part, cut from the full adapter by comparing the
Linear's local shape with the adapter's: a column-parallel Linear (wq, w1, ...) keeps its rows
of B and all of A, a row-parallel one (wo, w2) its columns of A and all of B, whose partial
products the all-reduce after the layer sums (B @ sum_r(A_r x_r) = B A x), as for the weights.

modules_to_save (whole replacement tensors) of a Linear (e.g. the LM head) become a per-slot
full weight applied per row with the same gathered kernel; of anything else (norms,
embeddings) they need `merge_adapter`. Memory: S * R * (in + out) per Linear (tiny-coder,
S=4, R=16: 2.9 MB in float32).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from kernels.lora import add_lora, gathered_linear
from model.loaders import tp as tp_plan
from model.loaders.lora import AdapterWeights

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter that cannot be put on this network (rank too large, unknown modules...)."""


class _Stack:
    """One Linear's slots."""

    def __init__(self, linear: nn.Linear, slots: int, rank: int, device, dtype):
        self.linear = linear
        self.a = torch.zeros(slots, rank, linear.in_features, device=device, dtype=dtype)
        self.b = torch.zeros(slots, linear.out_features, rank, device=device, dtype=dtype)
        self.full: torch.Tensor | None = None  # [S, out, in]: modules_to_save replacements
        self.full_bias: torch.Tensor | None = None  # [S, out]
        self.has_full: torch.Tensor | None = None  # [S] bool


class LoRABank:
    """The adapter slots of one network, with their hooks (see the module docstring)."""

    def __init__(self, net: nn.Module, max_loras: int, max_lora_rank: int,
                 modules: Callable[[str], bool] | None = None):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        cfg = getattr(net, "cfg", None)
        self.tp_rank = int(getattr(cfg, "tp_rank", 0))
        self.tp_size = int(getattr(cfg, "tp_size", 1))
        self.stacks: dict[str, _Stack] = {}
        self._hooks = []
        for name, mod in net.named_modules():
            if isinstance(mod, nn.Linear) and (modules is None or modules(name)):
                self.stacks[name] = _Stack(mod, max_loras, max_lora_rank, self.device, self.dtype)
                self._hooks.append(mod.register_forward_hook(self._hook(name), prepend=True))
        self.params = dict(net.named_parameters(remove_duplicate=False))
        # the row -> slot index every hook reads; grown (and `version` bumped) only when a batch
        # has more rows than ever before, so captured graphs see one storage
        self._rows = torch.full((256,), -1, dtype=torch.long, device=self.device)
        self._apply = False
        self._n_rows: int | None = None  # rows of the next forwards; None: every row alike
        self.version = 0  # bumped when tensors the hooks read are replaced (graphs recapture)
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self._name_of: dict[int, str] = {}
        self._pins = [0] * max_loras
        self.last_rows: tuple[list[int], bool] | None = None
        # called as f(slot, adapter) after each load: a TP leader repeats it on its followers
        self.on_load: list[Callable[[int, AdapterWeights], None]] = []
        self.loads = 0  # adapters put in a slot so far (a load after an eviction counts again)
        self.evictions = 0

    # --- rows -----------------------------------------------------------------------------
    def set_rows(self, slots: list[int], *, always: bool = False) -> None:
        """The adapter slot of each row of the next forwards (-1: none). always: run the hooks
        even when no row has an adapter (a static-shape forward must do the same work at
        every call, whatever rows it replays with)."""
        n = len(slots)
        if n > self._rows.numel():
            self._rows = torch.full((max(n, 2 * self._rows.numel()),), -1, dtype=torch.long,
                                    device=self.device)
            self.version += 1
        self._rows[:n].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self._apply = always or any(s >= 0 for s in slots)
        self._n_rows = n
        self.last_rows = (list(slots), always)  # what a TP leader sends its followers

    @contextlib.contextmanager
    def using(self, slot: int | None):
        """Every row of the forwards inside through `slot` (None / -1: the base model)."""
        s = -1 if slot is None else int(slot)
        old = self._rows.clone(), self._apply, self._n_rows
        self._rows.fill_(s)
        self._apply, self._n_rows = s >= 0, None
        try:
            yield self
        finally:
            self._rows.copy_(old[0])
            self._apply, self._n_rows = old[1], old[2]

    def _hook(self, name: str):
        def hook(module, inputs, out):
            if not self._apply:
                return out
            st = self.stacks[name]
            x = inputs[0]
            if self._n_rows is not None and x.shape[0] != self._n_rows:
                if x.dim() == 2:  # tokens flattened across rows (an MoE router): not per row
                    return out
                raise RuntimeError(f"{name}: input of {x.shape[0]} rows, LoRA rows set for "
                                   f"{self._n_rows}")
            flat = x.dim() == 2
            if flat:  # [B, in]
                x, out = x[:, None], out[:, None]
            slots = self._rows[: x.shape[0]]
            if st.full is not None:  # per-row replacement weights (modules_to_save)
                rep = st.has_full[slots.clamp(min=0)] & (slots >= 0)  # [B]
                alt = gathered_linear(x, st.full, torch.where(rep, slots, -1))
                if st.full_bias is not None:
                    alt = alt + st.full_bias[slots.clamp(min=0)][:, None, :]
                out = torch.where(rep[:, None, None], alt.to(out.dtype), out)
            y = add_lora(out, x, st.a, st.b, slots)
            return y[:, 0] if flat else y

        return hook

    def remove(self) -> None:
        """Take the hooks off (the network is the base model again)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # --- residency ------------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def resident(self) -> list[str]:
        """Adapter names in slots, least recently used first."""
        return list(self._slot_of)

    def acquire(self, adapter: AdapterWeights) -> int | None:
        """A slot holding `adapter`, pinned until release(): the one it is in, else a free
        slot, else the least recently used slot no running row holds (evicted). None when
        every slot is pinned (the caller waits)."""
        slot = self._slot_of.get(adapter.name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.load(slot, adapter)
        self._slot_of.move_to_end(adapter.name)
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise RuntimeError(f"adapter slot {slot} released more often than acquired")
        self._pins[slot] -= 1

    def evict(self, name: str) -> bool:
        """Drop `name` from its slot if no row holds it. -> whether it is gone."""
        slot = self._slot_of.get(name)
        if slot is None:
            return True
        if self._pins[slot]:
            return False
        del self._slot_of[name]
        del self._name_of[slot]
        self.evictions += 1
        return True

    def _free_slot(self) -> int | None:
        used = set(self._name_of)
        for s in range(self.max_loras):
            if s not in used:
                return s
        for name, s in self._slot_of.items():  # least recently used first
            if not self._pins[s]:
                log.info("evicting LoRA adapter %s from slot %d", name, s)
                self.evict(name)
                return s
        return None

    def check(self, adapter: AdapterWeights) -> None:
        """Raise AdapterError if `adapter` cannot be put in a slot of this network."""
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}, more than "
                               f"max_lora_rank {self.max_lora_rank}")
        for mod in adapter.lora:
            if mod not in self.stacks:
                raise AdapterError(f"adapter {adapter.name!r} targets {mod!r}, which is not a "
                                   "Linear layer of this network")
        for pname in adapter.replace:
            mod, _, leaf = pname.rpartition(".")
            if mod not in self.stacks or leaf not in ("weight", "bias"):
                raise AdapterError(f"adapter {adapter.name!r} replaces {pname!r} "
                                   "(modules_to_save): only Linear layers are replaced per row; "
                                   "merge this adapter into the weights instead")
            if self.params.get(pname) is not None and \
                    self.params[pname] is self.params.get("tok_embeddings.weight"):
                raise AdapterError(f"adapter {adapter.name!r} replaces {pname!r}, which is tied "
                                   "to the embedding")

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Put `adapter` in `slot` (this rank's part, scale folded into B), replacing what was
        there. In place: the stacks keep their storage."""
        self.check(adapter)
        old = self._name_of.pop(slot, None)
        if old is not None:
            self._slot_of.pop(old, None)
        for name, st in self.stacks.items():
            st.a[slot].zero_()
            st.b[slot].zero_()
            if st.has_full is not None:
                st.has_full[slot] = False
            m = adapter.lora.get(name)
            if m is None:
                continue
            a, b = _local(m.a, m.b, st.linear, self.tp_rank)
            r = a.shape[0]
            st.a[slot, :r].copy_(a.to(self.dtype))
            acc = torch.promote_types(self.dtype, torch.float32)  # scale before rounding
            st.b[slot, :, :r].copy_((b.to(acc) * m.scale).to(self.dtype))
        for pname, t in adapter.replace.items():
            mod, _, leaf = pname.rpartition(".")
            st = self.stacks[mod]
            self._ensure_full(st)
            local = _local_param(t, self.params[pname], self.tp_rank)
            if leaf == "weight":
                st.full[slot].copy_(local.to(self.dtype))
                if st.full_bias is not None and f"{mod}.bias" not in adapter.replace:
                    st.full_bias[slot].copy_(st.linear.bias.detach())
            elif self.tp_size > 1 and tp_plan.is_row_bias(pname) and self.tp_rank:
                st.full_bias[slot].zero_()  # a row-parallel bias is added once, on rank 0
            else:
                st.full_bias[slot].copy_(local.to(self.dtype))
            st.has_full[slot] = True
        self._slot_of[adapter.name] = slot
        self._name_of[slot] = adapter.name
        self.loads += 1
        for f in self.on_load:
            f(slot, adapter)

    def _ensure_full(self, st: _Stack) -> None:
        if st.full is not None:
            return
        lin = st.linear
        st.full = torch.zeros(self.max_loras, lin.out_features, lin.in_features,
                              device=self.device, dtype=self.dtype)
        st.full_bias = None if lin.bias is None else torch.zeros(
            self.max_loras, lin.out_features, device=self.device, dtype=self.dtype)
        st.has_full = torch.zeros(self.max_loras, dtype=torch.bool, device=self.device)
        self.version += 1  # the hook now reads more tensors: recapture graphs


def _local(a: torch.Tensor, b: torch.Tensor, linear: nn.Linear,
           rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's part of a [r, in] and b [out, r] for `linear` (its local shape)."""
    out_f, in_f = linear.weight.shape
    if a.shape[1] != in_f:
        if a.shape[1] % in_f:
            raise AdapterError(f"lora_A has {a.shape[1]} input features, the layer {in_f}")
        a = a[:, rank * in_f:(rank + 1) * in_f]  # row-parallel: this rank's inputs
    if b.shape[0] != out_f:
        if b.shape[0] % out_f:
            raise AdapterError(f"lora_B has {b.shape[0]} output features, the layer {out_f}")
        b = b[rank * out_f:(rank + 1) * out_f]  # column-parallel: this rank's outputs
    return a, b


def _local_param(t: torch.Tensor, param: torch.Tensor, rank: int) -> torch.Tensor:
    """This TP rank's part of a replacement tensor for `param` (same cut as the weights)."""
    if tuple(t.shape) == tuple(param.shape):
        return t
    for dim in range(t.dim()):
        n = param.shape[dim]
        if t.shape[dim] != n and t.shape[dim] % n == 0:
            return t.narrow(dim, rank * n, n)
    raise AdapterError(f"replacement tensor {tuple(t.shape)} does not fit {tuple(param.shape)}")


def apply_lora(net: nn.Module, max_loras: int, max_lora_rank: int,
               modules: Callable[[str], bool] | None = None) -> LoRABank:
    """Hook a LoRABank onto `net` (also kept as net.lora_bank); apply after apply_tp or a
    TP load, so slots are sized to the local shards. modules: which Linears (by name) get
    slots and hooks; default every one (training hooks only the ones it adapts)."""
    if getattr(net, "lora_bank", None) is not None:
        raise ValueError("apply_lora was already applied to this network")
    bank = LoRABank(net, max_loras, max_lora_rank, modules)
    net.lora_bank = bank
    return bank


def find_bank(net: nn.Module) -> LoRABank | None:
    """The bank of `net`, or of the shard a wrapper (engine/tensor_parallel.TPLeader) drives."""
    bank = getattr(net, "lora_bank", None)
    if bank is None and isinstance(getattr(net, "net", None), nn.Module):
        bank = getattr(net.net, "lora_bank", None)
    return bank


@torch.no_grad()
def merge_adapter(net: nn.Module, adapter: AdapterWeights) -> None:
    """Fold `adapter` into `net`'s weights: W += scale * B @ A (this rank's part, in float32,
    rounded once), modules_to_save copied over. The network then serves the adapter at the
    base model's cost; there is no way back short of reloading."""
    mods = dict(net.named_modules())
    params = dict(net.named_parameters(remove_duplicate=False))
    rank = int(getattr(getattr(net, "cfg", None), "tp_rank", 0))
    world = int(getattr(getattr(net, "cfg", None), "tp_size", 1))
    for name, m in adapter.lora.items():
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear):
            raise AdapterError(f"adapter {adapter.name!r} targets {name!r}, not a Linear layer")
        a, b = _local(m.a, m.b, lin, rank)
        if any(lin.weight is p for n, p in params.items() if not n.startswith(name + ".")):
            # a tied LM head: the LoRA is the head's alone (as in PEFT), so untie it first
            lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        w = lin.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        w.copy_((w.to(acc) + m.scale * (b.to(acc) @ a.to(acc)).to(w.device)).to(w.dtype))
    for pname, t in adapter.replace.items():
        p = params.get(pname)
        if p is None:
            raise AdapterError(f"adapter {adapter.name!r} replaces {pname!r}, not a parameter")
        if pname in ("lm_head.weight", "tok_embeddings.weight") and \
                params["lm_head.weight"] is params["tok_embeddings.weight"]:
            raise AdapterError(f"adapter {adapter.name!r} replaces {pname!r}, which is tied "
                               "to the embedding")
        if world > 1 and rank and tp_plan.is_row_bias(pname):
            p.zero_()  # a row-parallel bias is added once, on rank 0
        else:
            p.copy_(_local_param(t, p, rank).to(p.device, p.dtype))
