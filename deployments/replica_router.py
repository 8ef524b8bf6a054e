"""LeastBacklogRouter: Serve request router that sends each request to the replica with the
least outstanding work (token backlog over capacity, not request count).

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="deployments.replica_router:LeastBacklogRouter",
        request_routing_stats_period_s=1))

Why not Serve's default (power of two choices on request counts): a diffusion request's cost is
its tokens times its steps per block, so ten 16-token completions at 4 steps are far less work
than one 512-token answer at 32 steps. Each ModelServer replica publishes its engine's token
backlog and measured capacity through `record_routing_stats` (Serve polls it every
`request_routing_stats_period_s`); this router ranks replicas by backlog / capacity, i.e. the
seconds each needs to finish what it already holds.

The stats are up to a period old, so requests routed since a replica's last report are added
to it as an estimate (the mean cost of a request on that replica), which keeps a burst
arriving within one period from all landing on the same replica. Ties (within 5 ms of work)
share a rank, where Serve's own queue-length check picks among them; a replica that is full
(max_ongoing_requests) is skipped by Serve and the next rank is tried.

LoRA adapters (Serve's model multiplexing, by the request's adapter): replicas are ranked first
by what they hold of the request's adapter, then by drain time within each level: those with
it in a slot (no load at all), those holding it read (a copy into a slot), then the rest (which
read it from disk on first use, the request's routing carrying its path). A replica that holds
it but is full is skipped by Serve like any other, so the next level takes the request.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from autoscaling.load import FALLBACK_CAPACITY

log = logging.getLogger("ray.serve")

TIE_S = 0.005  # replicas within 5 ms of work of each other are equally good
DEFAULT_REQUEST_TOKEN_STEPS = 1024.0  # cost estimate before any stats: 128 tokens x 8 steps


def replica_drain_s(stats: dict, routed_since: int, request_cost: float,
                    fallback_capacity: float) -> float:
    """Seconds of work on a replica: reported backlog + requests routed since, over capacity."""
    capacity = float(stats.get("capacity") or 0.0) or fallback_capacity
    backlog = float(stats.get("token_backlog") or 0.0) + routed_since * request_cost
    return backlog / capacity


def adapter_level(stats: dict, adapter: str | None) -> int:
    """0: the adapter is in a slot (or none is asked for), 1: held, 2: must be read."""
    if adapter is None or adapter in (stats.get("resident_adapters") or ()):
        return 0
    return 1 if adapter in (stats.get("adapters") or ()) else 2


def requested_adapter(pending_request: PendingRequest | None) -> str | None:
    """The LoRA adapter of a ModelServer.generate(request, routing) call, if any."""
    args = getattr(pending_request, "args", None) or ()
    return getattr(args[0], "adapter", None) if args else None


def rank_by_drain(drains: list[tuple[float, object]], tie_s: float = TIE_S) -> list[list]:
    """[(drain_s, replica)] -> ranks of replicas, least loaded first; near-ties share a rank."""
    ranks: list[list] = []
    last = None
    for d, r in sorted(drains, key=lambda x: x[0]):
        if last is not None and d - last <= tie_s:
            ranks[-1].append(r)
        else:
            ranks.append([r])
            last = d
    return ranks


class LeastBacklogRouter(RequestRouter):
    def initialize_state(self, fallback_capacity: float = FALLBACK_CAPACITY, **kwargs) -> None:
        self.fallback_capacity = fallback_capacity
        self._routed_since: dict[ReplicaID, int] = defaultdict(int)
        self._last_report: dict[ReplicaID, float] = {}

    def _ensure_state(self) -> None:
        if not hasattr(self, "_routed_since"):  # initialize_state is optional in Serve
            self.initialize_state()

    def _routed(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        reported = float(stats.get("reported_at") or 0.0)
        if self._last_report.get(replica.replica_id) != reported:
            self._last_report[replica.replica_id] = reported
            self._routed_since[replica.replica_id] = 0  # the new report already counts them
        return self._routed_since[replica.replica_id]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        self._ensure_state()
        if not candidate_replicas:
            return []
        adapter = requested_adapter(pending_request)
        levels: dict[int, list] = defaultdict(list)
        for r in candidate_replicas:
            stats = r.routing_stats or {}
            running = int(stats.get("running") or 0) + int(stats.get("queued") or 0)
            backlog = float(stats.get("token_backlog") or 0.0)
            cost = backlog / running if running else DEFAULT_REQUEST_TOKEN_STEPS
            levels[adapter_level(stats, adapter)].append(
                (replica_drain_s(stats, self._routed(r), cost, self.fallback_capacity), r))
        return [rank for level in sorted(levels) for rank in rank_by_drain(levels[level])]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        self._ensure_state()
        self._routed_since[replica_id] += 1
