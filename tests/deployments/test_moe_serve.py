"""A LLaDA2 checkpoint directory (MoE, blocks aligned to position 0) served through the OpenAI
API with the real engine behind a LocalBackend (no Ray): the answer is the reference sampler's
with LLaDA2's published defaults (threshold 0.95 committing at least the scheduled count,
argmax), streaming adds up to it, and LLaDA2.2's token editing is refused at deploy."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from deployments.backends import LocalBackend
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.step_router import Ladder, StepRouter
from engine import Engine, EngineConfig
from engine.types import ModelInfo
from model import load_pretrained
from model.sampling import SamplingParams, generate

from ..model.moe_checkpoints import make_llada2
from .conftest import app_args

MODEL = "llada2-tiny"
MESSAGES = [{"role": "user", "content": "def add(a, b): return a + b"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada2-serve") / "LLaDA2-tiny"
    make_llada2(d)
    return d


@contextlib.asynccontextmanager
async def served(d, **info_kw):
    net, tok, cfg = load_pretrained(d, progress=False)
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4))
    await engine.start()
    info = ModelInfo.from_config(cfg, MODEL, **info_kw)
    service = OpenAIService(info, tok, LocalBackend(engine), app_args(),
                            router=StepRouter(Ladder([8, 4], [2.0])))
    await service.start()
    transport = httpx.ASGITransport(app=build_openai_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, net, tok
    finally:
        await service.stop()
        await engine.shutdown()


async def test_chat_completion_is_the_reference_with_llada2_defaults(ckpt):
    async with served(ckpt) as (client, net, tok):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 40, "denoising_steps": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        want = generate(net, tok.chat_prompt(MESSAGES), SamplingParams(
            max_new_tokens=40, block_length=32, steps=8, confidence_threshold=0.95,
            threshold_floor="schedule", scoring="drawn", temperature=0.0), tokenizer=tok)
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["completion_tokens"] == len(want.tokens)
        assert body["usage"]["denoising_steps"] == want.steps
        assert body["choices"][0]["finish_reason"] == want.finish_reason
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": MESSAGES, "max_tokens": 40, "denoising_steps": 8,
                "stream": True}) as s:
            assert s.status_code == 200
            chunks = [json.loads(line[6:]) async for line in s.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
        assert text == want.text


async def test_a_request_may_take_fast_dllm_s_threshold_rule(ckpt):
    """Request fields still override the family: a block length of 8 and a lower threshold."""
    async with served(ckpt) as (client, net, tok):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "x = 1", "max_tokens": 19, "denoising_steps": 4,
            "block_length": 8, "confidence_threshold": 0.5})
        assert r.status_code == 200, r.text
        want = generate(net, tok.completion_prompt("x = 1"), SamplingParams(
            max_new_tokens=19, block_length=8, steps=4, confidence_threshold=0.5,
            threshold_floor="schedule", scoring="drawn"), tokenizer=tok)
        assert r.json()["choices"][0]["text"] == want.text


def test_token_editing_is_refused_at_deploy(ckpt):
    _, _, cfg = load_pretrained(ckpt, progress=False)
    with pytest.raises(ValueError, match="token editing"):
        ModelInfo.from_config(cfg, MODEL, family_options={"token_editing": True})
