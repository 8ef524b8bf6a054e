"""Observability: the app's metric names in one place (metrics.py), the Grafana dashboard built as
code (dashboard.py: `dllm dashboard --out FILE | --upload --url URL`), and Prometheus scrape
configs for Ray's metrics ports (prometheus.py, prometheus.yml). See docs/deploy.md.
"""
