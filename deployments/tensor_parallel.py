"""A tensor-parallel ModelServer replica: N GPUs as one placement group, one actor per extra rank.

    # deployments/app.py gives the replica N bundles (PACK) when tensor_parallel_size = N > 1:
    #   placement_group_bundles=[{"GPU": 1, "CPU": c}] * N; the replica itself sits in bundle 0
    group = await TensorParallelGroup.start(server_config)   # inside the replica = rank 0
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
engine.tensor_parallel.TPLeader: the engine runs unchanged on rank 0 and every forward is first
sent to the rank actors as a Ray actor call (ordered per caller), whose collectives then meet rank
0's. Followers wait on nothing while the replica is idle, so no collective times out between
requests; a collective does time out (`collective_timeout_s`) when a rank has died mid-step, and
`check` then fails the health check so Serve replaces the whole replica with a fresh group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("ray.serve")

COLLECTIVE_TIMEOUT_S = 120.0  # a dead rank fails the step after this instead of hanging it


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid()}


@ray.remote(concurrency_groups={"control": 1})
class RankWorker:
    """Rank r > 0 of a tensor-parallel replica: its shard, its KV storage, the same steps as
    rank 0. Steps run one at a time in submission order; `ping` has its own thread so a health
    check answers during a long step."""

    def __init__(self, rank: int, world_size: int, torch_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.follower = None
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def where(self) -> dict:
        return _where()

    def setup(self, init_method: str, source: str, device: str, dtype: str,
              timeout_s: float, env: dict) -> dict:
        from engine.tensor_parallel import TPFollower
        from model.parallel import init_distributed, load_sharded

        os.environ.update(env)
        dev = init_distributed(self.rank, self.world_size, init_method, _device(device),
                               timeout_s=timeout_s)
        net, _, _ = load_sharded(source, self.rank, self.world_size, device=dev,
                                 dtype=_dtype(dtype))
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


def _free_port(host: str) -> int:
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

    @classmethod
    async def start(cls, config, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
                    ) -> TensorParallelGroup:
        """Start ranks 1..N-1 in the current placement group's bundles, join them in one
        process group with this process as rank 0, load every rank's slice."""
        from ray.util import get_current_placement_group

        from engine.tensor_parallel import TPLeader
        from model.parallel import init_distributed, load_sharded

        n = int(config.tensor_parallel_size)
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
                resources=bundle).remote(r, n, config.torch_threads))
        where = await asyncio.gather(*(w.where.remote() for w in workers))
        me = _where()
        device = _device(config.device)
        env: dict[str, str] = {}
        if all(w["node_id"] == me["node_id"] for w in where):
            host = "127.0.0.1"  # one node (PACK's usual outcome): keep the traffic on loopback
            if not device.startswith("cuda") and "GLOO_SOCKET_IFNAME" not in os.environ:
                env["GLOO_SOCKET_IFNAME"] = "lo"
        else:
            host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{_free_port(host)}"
        log.info("tensor-parallel replica: %d ranks, %s, rendezvous %s", n,
                 "one node" if host == "127.0.0.1" else "several nodes", init_method)
        setups = [w.setup.remote(init_method, config.model, config.device, config.dtype,
                                 collective_timeout_s, env) for w in workers]
        os.environ.update(env)
        dev = await asyncio.to_thread(init_distributed, 0, n, init_method, device,
                                      collective_timeout_s)
        net, tok, cfg = await asyncio.to_thread(load_sharded, config.model, 0, n, device=dev,
                                                dtype=_dtype(config.dtype))
        ranks = [{"rank": 0, "n_heads": net.cfg.n_heads, "n_kv_heads": net.cfg.n_kv_heads,
                  "params": sum(p.numel() for p in net.parameters()), **me}]
        ranks += await asyncio.gather(*setups)
        return cls(TPLeader(net, RayDispatch(workers)), tok, cfg, workers, ranks)

    def layout(self) -> list[dict]:
        return list(self.ranks)

    async def check(self, timeout_s: float = 10.0) -> None:
        """Raise when a rank actor is gone or does not answer."""
        await asyncio.wait_for(asyncio.gather(*(w.ping.remote() for w in self.workers)),
                               timeout=timeout_s)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.debug("destroy_process_group: %s", e)
