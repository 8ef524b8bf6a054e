"""Dream and Fast-dLLM v2 checkpoint directories served through the OpenAI API with the real
engine behind a LocalBackend (no Ray): a request without sampler fields gets the family's exact
sampler (Dream's time schedule and nucleus scores; Fast-dLLM v2's sub-blocks, threshold and
autoregressive block starts), the answer is the reference sampler's with those defaults, and the
request fields `step_schedule` / `scoring` select the earlier sampler or are refused with a 400."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from deployments.backends import LocalBackend
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.step_router import Ladder, StepRouter
from engine import Engine, EngineConfig
from engine.types import ModelInfo
from model import load_pretrained
from model.families import family_defaults
from model.sampling import SamplingParams, generate

from ..model.test_fast_dllm import make_fast_dllm
from ..model.test_loaders import make_dream
from .conftest import app_args

MESSAGES = [{"role": "user", "content": "def add(a, b): return a + b"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-serve")
    make_dream(root / "Dream-tiny")
    make_fast_dllm(root / "Fast_dLLM_v2-tiny")
    return {"dream": root / "Dream-tiny", "fast_dllm_v2": root / "Fast_dLLM_v2-tiny"}


@contextlib.asynccontextmanager
async def served(d):
    net, tok, cfg = load_pretrained(d, progress=False)
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4))
    await engine.start()
    service = OpenAIService(ModelInfo.from_config(cfg, "m"), tok, LocalBackend(engine),
                            app_args(), router=StepRouter(Ladder([8, 4], [2.0])))
    await service.start()
    transport = httpx.ASGITransport(app=build_openai_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, net, tok, cfg
    finally:
        await service.stop()
        await engine.shutdown()


@pytest.mark.parametrize("family,steps", [("dream", 24), ("fast_dllm_v2", 32)])
async def test_chat_without_sampler_fields_gets_the_family_sampler(dirs, family, steps):
    async with served(dirs[family]) as (client, net, tok, cfg):
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "messages": MESSAGES, "max_tokens": 24, "seed": 7,
            "denoising_steps": steps})  # pinned to the family's, else the router picks
        assert r.status_code == 200, r.text
        body = r.json()
        params = SamplingParams(**(family_defaults(cfg).sampling_kwargs(24)
                                   | {"steps": steps, "seed": 7}))
        want = generate(net, tok.chat_prompt(MESSAGES), params, tokenizer=tok)
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["completion_tokens"] == len(want.tokens)
        assert body["usage"]["denoising_steps"] == want.steps


async def test_dream_request_may_take_the_earlier_sampler_or_get_a_400(dirs):
    async with served(dirs["dream"]) as (client, net, tok, cfg):
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                "denoising_steps": 16, "step_schedule": "even", "scoring": "raw"}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        want = generate(net, tok.chat_prompt(MESSAGES), SamplingParams(**(
            family_defaults(cfg).sampling_kwargs(16)
            | {"temperature": 0.0, "step_schedule": "even", "scoring": "raw"})), tokenizer=tok)
        assert r.json()["choices"][0]["message"]["content"] == want.text
        r = await client.post("/v1/chat/completions", json=body | {"scoring": "softmax"})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
