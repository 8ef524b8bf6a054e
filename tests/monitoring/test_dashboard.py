"""`dllm dashboard`: the JSON Grafana stores, the upload over HTTP, and the urllib3 trap."""

from __future__ import annotations

import importlib.metadata
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from monitoring.dashboard import UID, dashboard_json, main


def panels(model: dict) -> list[dict]:
    return [p for p in model["panels"] if p.get("type") != "row"]


def test_dashboard_out_writes_grafana_json(tmp_path):
    out = tmp_path / "dash" / "dllm.json"
    main(["--out", str(out)])
    model = json.loads(out.read_text())
    assert model["uid"] == UID and model["title"]
    assert {v["name"] for v in model["templating"]["list"]} == {"datasource", "application"}
    assert len(panels(model)) >= 15
    for panel in panels(model):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs) and all(refs), panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]
    # Panels do not overlap on the 24-column grid.
    cells = set()
    for panel in model["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel.get("title")
                cells.add((x, y))


def test_dashboard_needs_an_action():
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["--upload"])  # no --url


def test_default_install_keeps_the_genuine_urllib3():
    """grafana-client pulls niquests -> urllib3-future, which replaces the urllib3 module that
    requests (and Ray) use. It must stay an optional extra, out of the serving environment."""
    import urllib3

    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("urllib3-future")
    assert urllib3.__version__ == importlib.metadata.version("urllib3")


class FakeGrafana(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeGrafana.received.append((self.path, self.headers.get("Authorization"), body))
        reply = json.dumps(
            {
                "status": "success",
                "uid": body["dashboard"]["uid"],
                "url": f"/d/{body['dashboard']['uid']}/x",
                "version": 1,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_upload_posts_the_dashboard_with_the_api_key(monkeypatch, capsys):
    pytest.importorskip("grafana_client", reason="the optional extra `grafana` is not installed")
    server = HTTPServer(("127.0.0.1", 0), FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("GRAFANA_API_KEY", "glsa_test")
        main(["--upload", "--url", f"http://127.0.0.1:{server.server_port}", "--folder-uid", "ops"])
    finally:
        server.shutdown()
    ((path, auth, body),) = FakeGrafana.received
    assert path == "/api/dashboards/db" and auth == "Bearer glsa_test"
    assert body["overwrite"] is True and body["folderUid"] == "ops"
    assert body["dashboard"] == dashboard_json()
    assert f"/d/{UID}/" in capsys.readouterr().out
