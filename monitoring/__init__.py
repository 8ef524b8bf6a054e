"""Observability: every metric defined once (metrics.py: name, kind, description, tags, buckets;
deployments/metrics.py builds the Ray Serve metrics from it), the Grafana dashboard built as code
from a table of panels (dashboard.py: `dllm dashboard --out FILE | --upload --url URL`), and
Prometheus scrape configs for Ray's metrics ports (prometheus.py, prometheus.yml). See
docs/deploy.md.
"""
