"""The Prometheus scrape configs: the checked-in file is the generator's output, and the
configs parse with promtool when it is installed (Debian's `prometheus` package ships it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring.prometheus import dump, kubernetes_config, local_config, main

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_kubernetes_config_is_the_generated_one(capsys):
    main(["kubernetes"])
    assert (REPO / "monitoring" / "prometheus.yml").read_text() == capsys.readouterr().out


def test_kubernetes_config_keeps_only_ray_pods_metrics_port():
    (job,) = kubernetes_config()["scrape_configs"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps == {("__meta_kubernetes_pod_label_ray_io_is_ray_node",): "yes",
                     ("__meta_kubernetes_pod_container_port_name",): "metrics"}
    # The pods of k8s/*.yaml name their metrics port "metrics".
    for manifest in (REPO / "k8s").glob("*.yaml"):
        text = manifest.read_text()
        assert "name: metrics" in text and 'metrics-export-port: "8080"' in text, manifest.name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_local_config_passes_promtool(tmp_path):
    path = tmp_path / "prometheus.yml"
    path.write_text(dump(local_config(["127.0.0.1:8080", "127.0.0.1:8081"], 0.5)))
    assert yaml.safe_load(path.read_text())["global"]["scrape_interval"] == "500ms"
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
