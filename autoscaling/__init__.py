"""Cluster load and autoscaling.

- `autoscaling.load`: the load model. Model-server replicas report their engine stats
  (token backlog, measured capacity); `LoadBoard` aggregates them into a `ClusterLoad` whose
  `drain_s` (seconds of accepted work) drives the step router (deployments/step_router.py), and
  `LoadSnapshotCache` keeps the latest snapshot refreshed in the background so that requests
  never make a remote call to read it; `PeakRate` is a replica's capacity (its best recent
  rate).
- The Serve autoscaling policy (a `policy_function` for `autoscaling_config.policy`) reads the
  same numbers from the replicas' `record_autoscaling_stats`.
"""
