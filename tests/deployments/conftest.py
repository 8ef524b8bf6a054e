"""Fixtures for the API tests: a small tokenizer and model directory (no weights) for the mock
engine (benchmarks/mock_engine.py), and an OpenAI app over a local MockEngine (no Ray).

    async with local_api(attention="full", api_keys={"k"}) as api:
        r = await api.client.post("/v1/completions", json={...})
        api.engine, api.service, api.backend.requests  # what reached the engine
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from autoscaling.load import ClusterLoad
from benchmarks.mock_engine import MockEngine, MockEngineConfig
from deployments.backends import LocalBackend
from deployments.config import AppArgs, LimitsArgs, parse_args
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.step_router import Ladder, StepRouter
from engine.types import ModelInfo
from model.config import ModelConfig
from model.data import python_corpus, stdlib_dir
from model.tokenizer import Tokenizer

LADDER = dict(steps=[16, 8, 4, 2], thresholds_s=[1.0, 2.0, 4.0], hysteresis=0.25, up_hold_s=0.0)
MODEL_ID = "test-coder"


def app_args(**settings) -> AppArgs:
    """AppArgs from flat test settings: limits fields (max_inflight, retry_after_s, ...),
    token_healing (model), full_attention_cache and engine_<field> (engine)."""
    args: dict = {"limits": {}, "engine": {}}
    for key, value in settings.items():
        if key == "token_healing":
            args["model"] = {"token_healing": value}
        elif key == "full_attention_cache":
            args["engine"]["full_attention_cache"] = value
        elif key.startswith("engine_"):
            args["engine"][key.removeprefix("engine_")] = value
        elif key in LimitsArgs.model_fields:
            args["limits"][key] = value
        else:
            raise TypeError(f"unknown test setting {key!r}")
    return parse_args(args)


@pytest.fixture(scope="session")
def api_tokenizer() -> Tokenizer:
    return Tokenizer.train(python_corpus(stdlib_dir() / "json").values(), vocab_size=400)


def tiny_model_config(tok: Tokenizer, **kw) -> ModelConfig:
    base = dict(name=MODEL_ID, vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                n_kv_heads=2, mlp_hidden=128, max_seq_len=512, block_length=32,
                default_steps_per_block=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                pad_id=tok.pad_id, eot_id=tok.eot_id)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def mock_model_dir(tmp_path_factory, api_tokenizer) -> Path:
    """config.json + tokenizer.json: what the mock engine needs to serve under Ray."""
    d = tmp_path_factory.mktemp("mock-model")
    tiny_model_config(api_tokenizer).save(d)
    api_tokenizer.save(d)
    return d


class RecordingBackend(LocalBackend):
    """LocalBackend that remembers every GenerationRequest (and its routing note)."""

    def __init__(self, engine, retry_after_s: float):
        super().__init__(engine, retry_after_s=retry_after_s)
        self.requests = []
        self.routing = []

    def generate(self, request, routing=None):
        self.requests.append(request)
        self.routing.append(routing)
        return super().generate(request, routing)


class FixedLoad:
    """A load source the test sets by hand (instead of the engine's own stats)."""

    def __init__(self):
        self.load = ClusterLoad(replicas=1, at=1.0)

    async def __call__(self) -> ClusterLoad:
        return self.load


@dataclass
class LocalAPI:
    client: httpx.AsyncClient
    service: OpenAIService
    engine: MockEngine
    backend: RecordingBackend
    tokenizer: Tokenizer
    info: ModelInfo
    fixed_load: FixedLoad | None = None
    extra: dict = field(default_factory=dict)

    async def set_load(self, drain_s: float) -> None:
        """Feed the step router a cluster load (only with fixed_load=True)."""
        self.fixed_load.load = ClusterLoad(replicas=1, drain_s=drain_s, at=1.0)
        await self.service.load_cache.refresh()


@pytest.fixture
def local_api(api_tokenizer):
    @contextlib.asynccontextmanager
    async def make(attention: str = "block_causal", mock: dict | None = None,
                   fixed_load: bool = False, ladder: dict | None = None,
                   api_keys: frozenset[str] | set[str] = frozenset(), router=None,
                   **settings):
        engine = MockEngine(MockEngineConfig(**(mock or {})))
        await engine.start()
        args = app_args(**settings)
        backend = RecordingBackend(engine, args.limits.retry_after_s)
        info = ModelInfo(id=MODEL_ID, max_seq_len=512, block_length=32, attention=attention,
                         default_steps=8, vocab_size=api_tokenizer.vocab_size)
        router = router or StepRouter(Ladder(**(ladder or LADDER)))
        service = OpenAIService(info, api_tokenizer, backend, args, frozenset(api_keys), router)
        fixed = None
        if fixed_load:
            fixed = FixedLoad()
            service.load_cache.fetch = fixed
        await service.start()
        transport = httpx.ASGITransport(app=build_openai_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            try:
                yield LocalAPI(client, service, engine, backend, api_tokenizer, info, fixed)
            finally:
                await service.stop()
                await engine.shutdown()

    return make
