"""LoRA adapters through the OpenAI API: two adapters and the base model from one engine.

A tiny model in our checkpoint format and two adapters written in the PEFT layout
(model/loaders/lora.write_adapter) are served as deployments/replica.build_engine serves
serve_config.yaml's `model.lora_modules`, behind the real OpenAIService (no Ray). The three
requests sent together must each get what they get alone, the adapters' answers must differ
from the base model's, /v1/models lists the adapters with their parent, an unknown model is a
404, and the run-time load endpoint (lora.dynamic_loading) refuses paths outside lora.root with a
400 before anything is read, and needs an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
import torch

from deployments.backends import LocalBackend
from deployments.config import parse_args
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.replica import build_engine
from deployments.step_router import Ladder, StepRouter
from engine.types import ModelInfo
from model.checkpoint import save_checkpoint
from model.loaders.lora import write_adapter
from tests.deployments.conftest import LADDER, tiny_model_config
from tests.engine.conftest import tiny_net
from tests.engine.test_lora_engine import random_adapter

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served_dirs(tmp_path_factory, api_tokenizer):
    root = tmp_path_factory.mktemp("lora_api")
    net = tiny_net(tiny_model_config(api_tokenizer, name="base"), seed=7, dtype=torch.float32)
    save_checkpoint(root / "base", net, api_tokenizer)
    adapters = root / "adapters"
    for i, name in enumerate(("repo-a", "repo-b", "extra")):
        # scale 1.5 / r, written as alpha 1.5 (write_adapter stores B unscaled)
        write_adapter(adapters / name, random_adapter(net, name, 4 + 2 * i, 20 + i), alpha=1.5)
    outside = tmp_path_factory.mktemp("outside")
    write_adapter(outside / "evil", random_adapter(net, "evil", 4, 99), alpha=1.5)
    return root / "base", adapters, outside / "evil"


@contextlib.asynccontextmanager
async def served(served_dirs, api_tokenizer, dynamic: bool = True):
    base, adapters, _ = served_dirs
    args = parse_args({
        "model": {"source": str(base), "id": "base",
                  "lora_modules": {"repo-a": str(adapters / "repo-a"),
                                   "repo-b": str(adapters / "repo-b")}},
        "engine": {"max_loras": 2, "max_lora_rank": 8, "max_num_seqs": 4},
        "lora": {"dynamic_loading": dynamic, "root": str(adapters)}})
    engine, tok, cfg = build_engine(args)
    reads = []
    read = engine.adapter_reader
    engine.adapter_reader = lambda name, path: reads.append(path) or read(name, path)
    info = ModelInfo.from_config(cfg, "base")
    service = OpenAIService(info, tok, LocalBackend(engine), args, frozenset({KEY}),
                            StepRouter(Ladder(**LADDER)))
    await service.start()
    transport = httpx.ASGITransport(app=build_openai_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     headers=AUTH) as client:
            yield client, engine, reads
    finally:
        await service.stop()
        await engine.shutdown()


def body(model: str, prompt: str = "def parse(") -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "denoising_steps": 4}


async def complete(client, model: str, prompt: str = "def parse("):
    r = await client.post("/v1/completions", json=body(model, prompt))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


async def test_two_adapters_and_base_concurrently_from_one_engine(served_dirs, api_tokenizer):
    async with served(served_dirs, api_tokenizer) as (client, engine, _):
        models = ["base", "repo-a", "repo-b"]
        alone = {m: await complete(client, m) for m in models}
        together = await asyncio.gather(*[complete(client, m) for m in models * 2])
        assert together == [alone[m] for m in models * 2]
        assert len({alone[m] for m in models}) == 3, alone  # each adapter changes the answer
        lora = engine.stats().extra["lora"]
        assert sorted(lora["resident"]) == ["repo-a", "repo-b"] and lora["evictions"] == 0

        r = await client.get("/v1/models")
        cards = {c["id"]: c for c in r.json()["data"]}
        assert set(cards) == {"base", "repo-a", "repo-b"}
        assert cards["repo-a"]["parent"] == "base" and "parent" not in cards["base"]
        r = await client.get("/v1/models/repo-b")
        assert r.status_code == 200 and r.json()["parent"] == "base"
        r = await client.post("/v1/completions", json=body("repo-z"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_dynamic_loading_takes_only_directories_under_the_root(served_dirs, api_tokenizer):
    _, adapters, evil = served_dirs
    async with served(served_dirs, api_tokenizer) as (client, engine, reads):
        for path in (str(evil), str(adapters / ".." / ".." / evil.parent.name / "evil"),
                     "../" * 8 + str(evil).lstrip("/")):
            r = await client.post("/v1/load_lora_adapter",
                                  json={"lora_name": "evil", "lora_path": path})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["code"] == "path_outside_root"
        link = adapters / "link"  # a symbolic link inside the root to a directory outside
        link.symlink_to(evil, target_is_directory=True)
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "evil",
                                                              "lora_path": "link"})
        assert r.status_code == 400
        assert reads == [] and "evil" not in engine.adapter_names()  # nothing was read
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "extra"},
                              headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401

        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "extra"})
        assert r.status_code == 200, r.text
        assert reads == [str(Path(adapters / "extra").resolve())]
        text = await complete(client, "x")
        assert text != await complete(client, "base")
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "nope"})
        assert r.status_code == 400  # under the root, but no adapter there
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
        assert r.status_code == 200
        r = await client.post("/v1/completions", json=body("x"))
        assert r.status_code == 404


async def test_dynamic_loading_is_off_by_default(served_dirs, api_tokenizer):
    async with served(served_dirs, api_tokenizer, dynamic=False) as (client, _, reads):
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "extra"})
        assert r.status_code == 404 and reads == []


def test_config_refuses_adapters_without_slots(served_dirs):
    with pytest.raises(ValueError, match="max_loras"):
        parse_args({"model": {"lora_modules": {"a": "/x"}}})
    with pytest.raises(ValueError, match="lora.root"):
        parse_args({"engine": {"max_loras": 1}, "lora": {"dynamic_loading": True}})


async def test_router_sends_an_adapter_to_the_replica_that_holds_it():
    """Serve's multiplexing, by the request's adapter: in a slot > held > must be read, then
    the least drain time within each level."""
    from types import SimpleNamespace

    from deployments.replica_router import LeastBacklogRouter
    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    def replica(rid, backlog, adapters=(), resident=()):
        return SimpleNamespace(replica_id=rid, routing_stats={
            "token_backlog": backlog, "capacity": 1000.0, "running": 1, "queued": 0,
            "reported_at": 1.0, "adapters": list(adapters), "resident_adapters": list(resident)})

    idle = replica("idle", 0.0)
    holds = replica("holds", 3000.0, adapters=["a"])
    slot = replica("slot", 5000.0, adapters=["a"], resident=["a"])
    router = LeastBacklogRouter.__new__(LeastBacklogRouter)

    def pending(adapter):
        req = GenerationRequest("r", [1, 2], SamplingParams(), adapter=adapter)
        return SimpleNamespace(args=(req, {}), kwargs={})

    ranks = await router.choose_replicas([idle, holds, slot], pending("a"))
    assert [[r.replica_id for r in rank] for rank in ranks] == [["slot"], ["holds"], ["idle"]]
    ranks = await router.choose_replicas([idle, holds, slot], pending(None))
    assert [r.replica_id for rank in ranks for r in rank] == ["idle", "holds", "slot"]
