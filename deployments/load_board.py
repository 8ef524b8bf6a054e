"""The LoadBoard deployment: model-server replicas push their load, ingresses pull a snapshot.

    board = LoadBoardDeployment.bind()             # deployments/app.py
    await board.report.remote(replica_load.to_dict())     # each replica, ~4 times a second
    ClusterLoad.from_dict(await board.snapshot.remote())  # each ingress, every ladder.refresh_s

One remote call per refresh each way, never one per request: the step router reads the cached
snapshot (autoscaling.load.LoadSnapshotCache). The load model itself (ReplicaLoad, ClusterLoad,
LoadBoard) is plain Python in autoscaling/load.py.
"""

from __future__ import annotations

from ray import serve

from autoscaling.load import LoadBoard, ReplicaLoad


# ~8 calls a second per replica: no access log
@serve.deployment(name="LoadBoard", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0}, health_check_period_s=5,
                  logging_config={"enable_access_log": False})
class LoadBoardDeployment:
    def __init__(self, stale_after_s: float = 5.0):
        self.board = LoadBoard(stale_after_s)

    def report(self, load: dict) -> None:
        self.board.report(ReplicaLoad.from_dict(load))

    def forget(self, replica_id: str) -> None:
        self.board.forget(replica_id)

    def snapshot(self) -> dict:
        return self.board.snapshot().to_dict()
