"""Static-shape denoising forwards, replayed from CUDA graphs on CUDA (EngineConfig.cuda_graphs).

    static = StaticForward(net, max_graphs=256)   # one per StepRunner
    logits = static(ids, positions=pos, t=t, attn=ctx, logits_slice=order)   # as net(...)

A CUDA graph replays the kernels it recorded on the addresses it recorded, so every tensor a
forward reads must keep its shape and its storage from one step to the next. The step runner
(engine/batch.py) takes care of the shapes: rows, query length, cache window and logits rows all
rounded up to buckets, the padding masked or ignored. This module takes care of the storage: per
distinct set of input shapes (the *shape key*) it keeps static buffers for the inputs (ids,
positions, t, the logits_slice index) and for the attention context's tensors (the paged pool's
read_slots and key mask, or a dense mask), copies each call's values into them, and runs the net
on a context bound to the buffers. On CUDA the first call of a key warms up on a side stream
(Triton compiles, cuBLAS picks its kernels), captures one torch.cuda.CUDAGraph into a memory pool
shared by every graph, and replays it; later calls of the key only copy and replay.

Logits leave every graph through one flat buffer shared by all of them (each graph copies its
logits into the front of it): a graph keeping its own output would hold a [rows, M, V] tensor per
shape, 1 GB at 128 x 32 x 126464 in bf16. The caller must therefore read the result before the
next call, as the step runner does. When a new shape needs a larger buffer, it is reallocated and
the graphs captured so far are dropped (recaptured on their next use): a few times at most, as
the largest shape grows.

On a CPU (or with capture=False) the same buffers and bound contexts run eagerly: the padded
static path without capture, which tests pin to the eager engine. A net with host work in its
forward cannot be captured (a graph replays only kernels): the tensor-parallel leader
(engine/tensor_parallel.TPLeader, which dispatches every call to its followers) runs this path
uncaptured too.

Only forwards without side effects may be captured: the denoising step reads the cache and
writes nothing (its PagedAttention has append=False); cache writes stay eager.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from engine.kv_pool import PagedAttention
from engine.tensor_parallel import TPLeader
from model.transformer import DenseAttention

log = logging.getLogger(__name__)

# Forwards run before a capture, on a side stream: lazy initialisations (Triton kernel compiles,
# cuBLAS handles and workspaces, SDPA backend choice) must not happen inside the capture.
WARMUP_RUNS = 2


def attention_tensors(attn) -> dict[str, torch.Tensor]:
    """The tensors a forward reads from an engine attention context, by attribute name."""
    if attn is None:
        return {}
    if isinstance(attn, DenseAttention):
        return {} if attn.mask is None else {"mask": attn.mask}
    if isinstance(attn, PagedAttention):
        if attn.append:
            raise ValueError("a cache write (append=True) has side effects: it stays eager")
        return {"read_slots": attn.read_slots, "key_valid": attn.key_valid}
    raise TypeError(f"no static form for a {type(attn).__name__} attention context")


@dataclass
class _Shape:
    """Static buffers and (on CUDA) the graph of one shape key."""
    inputs: dict[str, torch.Tensor | None]  # name -> buffer (ids, positions, t, logits_slice)
    attn_buffers: dict[str, torch.Tensor]
    attn: object  # a copy of the first call's context, bound to attn_buffers
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # a view of the shared output buffer, once captured
    calls: int = 0


def _shape_key(ids: torch.Tensor, kwargs: dict, attn_t: dict) -> tuple:
    parts = [("ids", tuple(ids.shape), ids.dtype)]
    for name in sorted(kwargs):
        v = kwargs[name]
        if name == "attn":
            parts.append(("attn", type(v).__name__))
        elif v is None:
            parts.append((name, None))
        elif isinstance(v, torch.Tensor):
            parts.append((name, tuple(v.shape), v.dtype))
        else:
            raise TypeError(f"{name}: a static forward takes tensors or None, got "
                            f"{type(v).__name__}")
    parts += [(f"attn.{k}", tuple(v.shape), v.dtype) for k, v in sorted(attn_t.items())]
    return tuple(parts)


class StaticForward:
    """Call it like the net; see the module docstring.

    max_graphs: most graphs captured; shapes past it run their static path uncaptured.
    capture: None = on CUDA unless the net does host work per call (see above)."""

    def __init__(self, net: torch.nn.Module, max_graphs: int = 256, capture: bool | None = None):
        self.net = net
        self.device = next(net.parameters()).device
        host_work = isinstance(net, TPLeader)  # dispatches each forward's spec to the ranks
        cuda = self.device.type == "cuda"
        if capture is None:
            capture = cuda and not host_work
            if cuda and host_work:
                log.warning("cuda_graphs: %s dispatches every forward to other ranks from Python, "
                            "which a graph replay would skip; running static shapes uncaptured",
                            type(net).__name__)
        if capture and not cuda:
            raise ValueError("CUDA graphs need the net on a CUDA device")
        self.capture, self.max_graphs = capture, max_graphs
        self.shapes: dict[tuple, _Shape] = {}
        self._pool = None  # graph memory pool, shared by every capture
        self._out: torch.Tensor | None = None  # flat logits buffer shared by every graph
        self.captures = self.replays = self.uncaptured = 0
        self.capture_error: str | None = None
        self._warned_full = False
        if not capture:
            log.info("cuda_graphs: static shapes without capture (device %s)", self.device)

    @property
    def graphs(self) -> int:
        return sum(s.graph is not None for s in self.shapes.values())

    def stats(self) -> dict:
        return {"shapes": len(self.shapes), "graphs": self.graphs, "captures": self.captures,
                "replays": self.replays, "uncaptured": self.uncaptured,
                "capture_error": self.capture_error,
                "output_buffer_bytes": 0 if self._out is None
                else self._out.numel() * self._out.element_size()}

    # --- one forward ----------------------------------------------------------------------
    @torch.no_grad()  # a graph captured under autograd would keep its saved tensors alive
    def __call__(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """net(input_ids, **kwargs) through the static buffers of its shape key. kwargs as the
        net takes them (positions, t, attn, logits_slice), tensors or None. The result is only
        valid until the next call."""
        attn_t = attention_tensors(kwargs.get("attn"))
        key = _shape_key(input_ids, kwargs, attn_t)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = self._new_shape(input_ids, kwargs, attn_t)
        else:
            self._load(shape, input_ids, kwargs, attn_t)
        shape.calls += 1
        if shape.graph is None and self.capture:
            if self.graphs < self.max_graphs:
                try:
                    self._capture(shape)
                except Exception as e:  # an op that cannot be captured: say so, keep serving
                    log.exception("cuda_graphs: capture failed; static shapes run uncaptured "
                                  "from now on")
                    self.capture, self.capture_error = False, f"{type(e).__name__}: {e}"
                    shape.graph, shape.out = None, None
            elif not self._warned_full:
                self._warned_full = True
                log.warning("cuda_graphs: %d graphs captured (max_graphs); new shapes run "
                            "uncaptured", self.max_graphs)
        if shape.graph is not None:
            shape.graph.replay()
            self.replays += 1
            return shape.out
        self.uncaptured += 1
        return self._forward(shape)

    def _new_shape(self, ids, kwargs, attn_t) -> _Shape:
        inputs = {"input_ids": ids.clone()}
        for name, v in kwargs.items():
            if name != "attn":
                inputs[name] = None if v is None else v.clone()
        buffers = {k: v.clone() for k, v in attn_t.items()}
        attn = kwargs.get("attn")
        bound = copy.copy(attn)  # the same context, reading the buffers instead
        for k, v in buffers.items():
            setattr(bound, k, v)
        return _Shape(inputs, buffers, bound)

    def _load(self, shape: _Shape, ids, kwargs, attn_t) -> None:
        shape.inputs["input_ids"].copy_(ids)
        for name, v in kwargs.items():
            if name != "attn" and v is not None:
                shape.inputs[name].copy_(v)
        for k, v in attn_t.items():
            shape.attn_buffers[k].copy_(v)
        attn = kwargs.get("attn")
        if isinstance(attn, PagedAttention):  # what a TP follower rebuilds the context from
            shape.attn.args = attn.args

    def _forward(self, shape: _Shape) -> torch.Tensor:
        kw = {k: v for k, v in shape.inputs.items() if k != "input_ids"}
        return self.net(shape.inputs["input_ids"], attn=shape.attn, **kw)

    # --- capture --------------------------------------------------------------------------
    def _capture(self, shape: _Shape) -> None:
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                out = self._forward(shape)
        cur.wait_stream(side)
        out_shape, dtype, n = out.shape, out.dtype, out.numel()
        del out
        if self._out is None or self._out.numel() < n or self._out.dtype != dtype:
            # a larger buffer moves: every graph captured so far wrote into the old one
            size = max(n, 2 * self._out.numel() if self._out is not None else 0)
            for s in self.shapes.values():
                s.graph, s.out = None, None
            self._out = None
            self._out = torch.empty(size, dtype=dtype, device=self.device)
        target = self._out[:n].view(out_shape)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's thread may touch CUDA meanwhile (a new request's canvas
        # is made on the device in submit); under "global" that would abort this capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            target.copy_(self._forward(shape))
        shape.graph, shape.out = graph, target
        self.captures += 1
        log.debug("cuda_graphs: captured shape %d (%d graphs)", len(self.shapes), self.graphs)
