"""A tensor-parallel ModelServer replica: N GPUs as one placement group, one actor per extra rank.

    # deployments/app.py gives the replica N bundles (PACK) when tensor_parallel_size = N > 1:
    #   placement_group_bundles=[{"GPU": 1, "CPU": c}] * N; the replica itself sits in bundle 0
    group = await TensorParallelGroup.start(app_args.model)  # inside the replica = rank 0
    engine = Engine(group.leader, group.tokenizer, group.leader.cfg, engine_config)
    await group.check()          # health: every rank actor answers
    group.layout()               # where each rank runs: node, GPU ids, bundle
    group.shutdown()

The replica actor is rank 0's worker (it holds bundle 0's GPU): every step's logits and the
commit then stay in the process that runs the engine, with no extra hop per step or per event.
Ranks 1..N-1 are `RankWorker` actors pinned to bundles 1..N-1 of the replica's placement group
(Serve creates the group with the replica and removes it with the replica, so the ranks live and
die with it). All ranks join one torch.distributed group (NCCL on GPUs, gloo on CPUs), each loads
only its slice of the checkpoint (model/parallel.load_sharded), and rank 0's shard is wrapped in
engine.tensor_parallel.TPLeader: the engine runs unchanged on rank 0 and every forward's spec
is first sent to the other ranks, whose collectives then meet rank 0's. Two transports
(`tensor_parallel_transport`):
- "collective" (default): one torch.distributed broadcast of the spec per forward; each rank
  actor sits in `follow`, a loop over those broadcasts (engine.tensor_parallel.follow_broadcasts).
  No Ray call per step. An idle replica's followers would sit in the broadcast past the
  collective timeout, so a heartbeat thread sends a no-op spec after timeout / 4 without
  dispatches.
- "ray": each spec is an actor call to `step` (ordered per caller); idle followers wait on
  nothing. Simpler, and a Ray call of latency per step (bench_tp --ray measures it).
A collective times out (`collective_timeout_s`) when a rank has died mid-step (gloo fails at
once on a closed connection); the group is then broken, new requests get 503 and `check` fails
the health check, so Serve replaces the whole replica with a fresh group. `check` also fails
when a rank actor is gone or its broadcast loop has ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from dataclasses import dataclass, field

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import ModelArgs
from model.loaders import resolve_device, torch_dtype

log = logging.getLogger("ray.serve")


def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid()}


@ray.remote(concurrency_groups={"control": 1, "loop": 1})
class RankWorker:
    """Rank r > 0 of a tensor-parallel replica: its shard, its KV storage, the same steps as
    rank 0. Steps run one at a time in submission order (or inside `follow`'s loop); `ping` has
    its own thread so a health check answers during a long step."""

    def __init__(self, rank: int, world_size: int, torch_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.follower = None
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def where(self) -> dict:
        return _where()

    def setup(self, init_method: str, source: str, device: str, dtype: str,
              timeout_s: float, env: dict, context: dict | None = None) -> dict:
        from engine.tensor_parallel import TPFollower
        from model.parallel import init_distributed, load_sharded

        os.environ.update(env)
        dev = init_distributed(self.rank, self.world_size, init_method, resolve_device(device),
                               timeout_s=timeout_s)
        net, _, _ = load_sharded(source, self.rank, self.world_size, device=dev,
                                 dtype=torch_dtype(dtype), **(context or {}))
        self.follower = TPFollower(net)
        return {"rank": self.rank, "n_heads": net.cfg.n_heads, "n_kv_heads": net.cfg.n_kv_heads,
                "params": sum(p.numel() for p in net.parameters()), **_where()}

    def step(self, spec) -> int:
        try:
            return self.follower.step(spec)
        except Exception:
            # rank 0 ran the same code on the same inputs and fails there too: the engine
            # handles it (row-by-row retry); logged here so the rank's side is visible
            log.exception("tensor-parallel rank %d: forward failed", self.rank)
            raise

    @ray.method(concurrency_group="loop")
    def follow(self) -> int:
        """The "collective" transport: run every spec rank 0 broadcasts until the stop spec."""
        from engine.tensor_parallel import follow_broadcasts

        return follow_broadcasts(self.follower)

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return -1 if self.follower is None else self.follower.forwards


class RayDispatch:
    """TPLeader's transport: each forward's spec as an actor call to every rank actor."""

    def __init__(self, workers: list):
        self.workers = workers

    def __call__(self, spec) -> None:
        if spec is None:  # the broadcast loop's stop signal; actors are killed instead
            return
        for w in self.workers:
            w.step.remote(spec)  # fire and forget: the collectives are the synchronisation


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TensorParallelGroup:
    leader: object  # engine.tensor_parallel.TPLeader over rank 0's shard
    tokenizer: object
    cfg: object  # the full model's config
    workers: list
    ranks: list[dict]  # what each rank reported (rank 0 first)
    transport: str = "collective"
    loops: list = field(default_factory=list)  # "collective": each rank's `follow` call
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    async def start(cls, model: ModelArgs) -> TensorParallelGroup:
        """Start ranks 1..N-1 in the current placement group's bundles, join them in one
        process group with this process as rank 0, load every rank's slice."""
        from ray.util import get_current_placement_group

        from engine.tensor_parallel import TPLeader
        from model.parallel import init_distributed, load_sharded

        n, transport = model.tensor_parallel_size, model.tensor_parallel_transport
        collective_timeout_s = model.tensor_parallel_timeout_s
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < n:
            raise RuntimeError(
                f"tensor_parallel_size={n} needs a placement group of {n} bundles on the replica "
                "(deployments.app sets placement_group_bundles); got "
                f"{None if pg is None else len(pg.bundle_specs)} bundles")
        workers = []
        for r in range(1, n):
            bundle = dict(pg.bundle_specs[r])
            workers.append(RankWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=r),
                num_cpus=bundle.pop("CPU", 0), num_gpus=bundle.pop("GPU", 0),
                resources=bundle).remote(r, n, model.torch_threads))
        where = await asyncio.gather(*(w.where.remote() for w in workers))
        me = _where()
        device = resolve_device(model.device)
        env: dict[str, str] = {}
        if all(w["node_id"] == me["node_id"] for w in where):
            host = "127.0.0.1"  # one node (PACK's usual outcome): keep the traffic on loopback
            if not device.startswith("cuda") and "GLOO_SOCKET_IFNAME" not in os.environ:
                env["GLOO_SOCKET_IFNAME"] = "lo"
        else:
            host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        log.info("tensor-parallel replica: %d ranks, %s, rendezvous %s", n,
                 "one node" if host == "127.0.0.1" else "several nodes", init_method)
        # the deploy-time context overrides (rope scaling): every rank rotates alike
        context = dict(rope_scaling=model.rope_scaling, max_model_len=model.max_model_len)
        setups = [w.setup.remote(init_method, model.source, model.device, model.dtype,
                                 collective_timeout_s, env, context) for w in workers]
        os.environ.update(env)
        dev = await asyncio.to_thread(init_distributed, 0, n, init_method, device,
                                      collective_timeout_s)
        net, tok, cfg = await asyncio.to_thread(load_sharded, model.source, 0, n, device=dev,
                                                dtype=torch_dtype(model.dtype), **context)
        ranks = [{"rank": 0, "n_heads": net.cfg.n_heads, "n_kv_heads": net.cfg.n_kv_heads,
                  "params": sum(p.numel() for p in net.parameters()), **me}]
        ranks += await asyncio.gather(*setups)
        if transport == "ray":
            return cls(TPLeader(net, RayDispatch(workers)), tok, cfg, workers, ranks, transport)
        from engine.tensor_parallel import BroadcastDispatch

        group = cls(TPLeader(net, BroadcastDispatch()), tok, cfg, workers, ranks, transport,
                    [w.follow.remote() for w in workers])
        group._start_heartbeat(collective_timeout_s / 4)
        return group

    def _start_heartbeat(self, every_s: float) -> None:
        def beat():
            while not self._stop.wait(every_s / 2):
                try:
                    self.leader.heartbeat(every_s)
                except Exception as e:  # the group is broken: check() reports it
                    log.error("tensor-parallel heartbeat failed: %s", e)
                    return

        threading.Thread(target=beat, name="dllm-tp-heartbeat", daemon=True).start()

    def layout(self) -> list[dict]:
        return list(self.ranks)

    async def check(self, timeout_s: float = 10.0) -> None:
        """Raise when a rank actor is gone or does not answer, or its broadcast loop ended."""
        await asyncio.wait_for(asyncio.gather(*(w.ping.remote() for w in self.workers)),
                               timeout=timeout_s)
        if self.loops:
            done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
            if done:
                await done[0]  # raises the loop's error, if it had one
                raise RuntimeError("a tensor-parallel rank left its broadcast loop")

    def shutdown(self) -> None:
        self._stop.set()
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            import torch.distributed as dist

            # NCCL's teardown can wait on the peers just killed; the process is going anyway
            if dist.is_initialized() and dist.get_backend() != "nccl":
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.debug("destroy_process_group: %s", e)
