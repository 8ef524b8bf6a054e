"""Tensor-parallel steps in the engine: the engine drives rank 0, every other rank follows.

    # rank 0 (the replica): wrap its shard; the Engine is unchanged
    leader = TPLeader(shard, dispatch)                 # dispatch(spec) delivers to ranks 1..N-1
    engine = Engine(leader, tokenizer, leader.cfg, config)
    # rank r > 0: run every spec rank 0 dispatched, in order
    follower = TPFollower(shard)
    follower.step(spec)

    # in processes of one torch.distributed group (tests, scripts): the transport is a broadcast
    leader = TPLeader(shard, BroadcastDispatch())      # rank 0
    follow_broadcasts(TPFollower(shard))               # ranks > 0, until leader.close()

Every forward of a model sharded with model/parallel.apply_tp contains all-reduces, so all ranks
must run the same forward on the same inputs at the same time. The engine's scheduler, KV page
allocation and commit rule stay on rank 0 alone: before each forward the leader sends a *spec*
(the input tensors and how to rebuild the attention context), then runs its own shard; the
followers run theirs on the spec and the collectives line them up. What followers keep is only
storage: a KV pool with their own heads (n_kv_heads / N), indexed by the page tables rank 0
allocated, so the paged cache stays consistent with no further traffic.

Followers skip the LM head (logits_slice=slice(0, 0)): it is replicated and has no collective,
and only rank 0 commits tokens. A vocab-parallel head (apply_tp(..., vocab_parallel=True))
all-gathers its logits, so then followers compute it too.

The spec travels as plain Python and CPU tensors, so any transport works: `BroadcastDispatch`
(torch.distributed broadcast_object_list, one collective per forward) between processes of one
group, or Ray actor calls (deployments/tensor_parallel.py). A follower in a broadcast loop sits
in a collective while the replica is idle, and collectives time out: `TPLeader.heartbeat` sends a
no-op spec when nothing was dispatched for a while. Dispatch + forward and heartbeats hold one
lock, so collectives on the group never interleave between threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.kv_pool import PagedAttention
from model.transformer import DenseAttention

log = logging.getLogger(__name__)

Spec = dict[str, Any]
NOOP: Spec = {"noop": True}  # a heartbeat: followers run nothing


def _cpu(x):
    # No copy of CPU tensors: both transports serialise the spec inside dispatch (a broadcast
    # pickles it, a Ray call serialises its arguments), before the graph path's static input
    # buffers can change at the next step. A transport that serialised later would need one.
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def describe_attention(attn) -> tuple | None:
    """What a follower needs to rebuild `attn` over its own storage (engine contexts only)."""
    if attn is None:
        return None
    if isinstance(attn, DenseAttention):
        rows = getattr(attn, "rows", None)  # per-row lengths: the same kernel path on every rank
        if rows is not None:
            rows = (_cpu(rows.key_valid), rows.max_keys, rows.total_keys, _cpu(rows.query_valid))
        return ("dense", _cpu(attn.mask), rows)
    if isinstance(attn, PagedAttention):
        pool, args = attn.pool, attn.args
        shape = dict(num_pages=pool.num_pages, page_size=pool.page_size,
                     dtype=str(pool.k.dtype).removeprefix("torch."))
        return ("paged", shape, {k: _cpu(v) for k, v in args.items()})
    raise TypeError(f"tensor parallelism cannot forward a {type(attn).__name__} context; "
                    "the engine's are DenseAttention and the paged KV pool's")


class TPLeader(nn.Module):
    """Rank 0's shard behind the interface the engine calls: net(ids, positions=, t=, attn=,
    logits_slice=). Each call first dispatches the same call to the other ranks."""

    def __init__(self, net: nn.Module, dispatch: Callable[[Spec | None], None]):
        super().__init__()
        self.net = net
        self.cfg = net.cfg
        self.dispatch = dispatch
        self.forwards = 0
        # set when a collective failed (a rank died or timed out): the group cannot step again
        self.broken: str | None = None
        self._lock = threading.Lock()  # one thread at a time issues collectives on the group
        self.last_dispatch = time.monotonic()

    def forward(self, input_ids: torch.Tensor, *, positions=None, t=None, attn=None,
                logits_slice=None) -> torch.Tensor:
        if self.broken:
            raise RuntimeError(f"the tensor-parallel group is broken: {self.broken}")
        spec = dict(input_ids=_cpu(input_ids), positions=_cpu(positions), t=_cpu(t),
                    logits_slice=_cpu(logits_slice), attn=describe_attention(attn))
        bank = getattr(self.net, "lora_bank", None)
        if bank is not None:  # each row's LoRA slot (model/lora.py), the same on every rank
            spec["lora_rows"] = bank.last_rows
        with self._lock:
            try:
                self._send(spec)
                self.forwards += 1
                return self.net(input_ids, positions=positions, t=t, attn=attn,
                                logits_slice=logits_slice)
            except Exception as e:
                self._check_failure(e)
                raise

    def lora_load(self, slot: int, adapter, max_loras: int, max_lora_rank: int) -> None:
        """Repeat a LoRA slot load on the followers (each keeps its slice of the adapter;
        the first load hooks a bank of the same shape onto their shard)."""
        with self._lock:
            try:
                self._send({"lora_load": (slot, adapter, max_loras, max_lora_rank)})
            except Exception as e:
                self._check_failure(e)
                raise

    def _send(self, spec: Spec | None) -> None:
        self.dispatch(spec)
        self.last_dispatch = time.monotonic()

    def _check_failure(self, e: Exception) -> None:
        if is_collective_failure(e):
            self.broken = f"{type(e).__name__}: {e}"
            log.error("tensor-parallel collective failed; no further steps: %s", e)

    def heartbeat(self, idle_s: float) -> bool:
        """Send a no-op spec if nothing was dispatched for idle_s seconds (and no forward is
        running). -> whether one was sent. Keeps broadcast-loop followers inside their
        collective timeout while the replica is idle."""
        if self.broken or not self._lock.acquire(blocking=False):
            return False
        try:
            if time.monotonic() - self.last_dispatch < idle_s:
                return False
            self._send(NOOP)
            return True
        except Exception as e:
            self._check_failure(e)
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Tell followers in a broadcast loop to return (None is the stop spec)."""
        with self._lock:
            self._send(None)


def is_collective_failure(e: BaseException) -> bool:
    """A rank gone or timed out (as opposed to a bad input every rank refuses alike)."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                            "timed out", "Timed out"))


class TPFollower:
    """Rank r > 0: runs the forwards rank 0 dispatched, on its own shard and KV storage."""

    def __init__(self, net: nn.Module):
        self.net = net.eval()
        p = next(net.parameters())
        self.device = p.device
        self.pool = None
        self.forwards = 0
        # apply_tp marks a vocab-parallel head: its all-gather needs every rank
        self.head_collective = bool(getattr(net, "tp_vocab_parallel", False))

    def _pool(self, num_pages: int, page_size: int, dtype: str):
        from engine.kv_pool import PagedKVPool

        p = self.pool
        if p is None or (p.num_pages, p.page_size, str(p.k.dtype)) != \
                (num_pages, page_size, f"torch.{dtype}"):
            self.pool = PagedKVPool(self.net.cfg, num_pages, page_size, self.device,
                                    getattr(torch, dtype))
        return self.pool

    def _attention(self, desc):
        if desc is None:
            return None
        kind = desc[0]
        if kind == "dense":
            _, mask, rows = desc
            if rows is not None:
                from kernels.attention import Ragged

                kv, max_keys, total, qv = rows
                rows = Ragged(kv.to(self.device), max_keys, total,
                              None if qv is None else qv.to(self.device))
            return DenseAttention(None if mask is None else mask.to(self.device), rows=rows)
        _, shape, args = desc
        args = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                for k, v in args.items()}
        return self._pool(**shape).context(**args)

    def step(self, spec: Spec) -> int:
        """Run one dispatched forward; returns how many this follower has run."""
        if spec.get("noop"):
            return self.forwards
        if "lora_load" in spec:
            from model.lora import apply_lora

            slot, adapter, max_loras, max_rank = spec["lora_load"]
            bank = getattr(self.net, "lora_bank", None) or apply_lora(self.net, max_loras, max_rank)
            bank.load(slot, adapter)
            return self.forwards
        bank = getattr(self.net, "lora_bank", None)
        if bank is not None and spec.get("lora_rows") is not None:
            rows, always = spec["lora_rows"]
            bank.set_rows(rows, always=always)
        dev = self.device

        def on_dev(x):
            return x.to(dev) if isinstance(x, torch.Tensor) else x

        logits_slice = on_dev(spec["logits_slice"]) if self.head_collective else slice(0, 0)
        with torch.no_grad():
            self.net(on_dev(spec["input_ids"]), positions=on_dev(spec["positions"]),
                     t=on_dev(spec["t"]), attn=self._attention(spec["attn"]),
                     logits_slice=logits_slice)
        self.forwards += 1
        return self.forwards


# --- transport between processes of one torch.distributed group ------------------------------

class BroadcastDispatch:
    """dispatch(spec) as a broadcast from rank 0 of `group` (gloo: CPU; NCCL: the pickled spec
    goes through the current CUDA device)."""

    def __init__(self, group=None, src: int = 0):
        self.group, self.src = group, src

    def __call__(self, spec: Spec | None) -> None:
        dist.broadcast_object_list([spec], src=self.src, group=self.group, device=_comm_device())


def follow_broadcasts(follower: TPFollower, group=None, src: int = 0) -> int:
    """A follower's loop: run each broadcast spec until the stop spec (None). A forward that
    fails here failed on rank 0 too (same code, same inputs), so it is logged and the loop goes
    on, as the engine retries rows. Returns the number of forwards run."""
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=src, group=group, device=_comm_device())
        if box[0] is None:
            return follower.forwards
        try:
            follower.step(box[0])
        except Exception:
            log.exception("tensor-parallel follower: forward failed")


def _comm_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None
