"""Long context and classifier-free guidance through the OpenAI API (LocalBackend, no Ray).

- The shipped tiny-coder (trained at 2048 tokens) served at 4x its context from app args
  (`model.rope_scaling` + `model.max_model_len`, as serve_config.yaml sets them): /v1/models
  reports 8192, a prompt past the trained length is answered, one past 8192 is a 413 that names
  the limit; a request needing more KV than the replica's pool is a 413 too.
- Full-attention rows past engine.max_uncached_full_attention_tokens are refused (413) unless
  they use the prefix/dual cache.
- `cfg_scale` on a tiny LLaDA-format checkpoint answers what model/sampling.generate answers
  with the same parameters (tests/model/test_cfg.py pins that to LLaDA's generate); on a family
  without guidance it is a 400.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest

from deployments.config import parse_args
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.replica import build_engine
from deployments.step_router import Ladder, StepRouter
from engine.types import ModelInfo
from model.sampling import generate
from tests.deployments.conftest import LADDER, RecordingBackend
from tests.deployments.test_openai_api import assert_error
from tests.model.test_loaders import make_llada

STRETCHED = {"source": "tiny-coder", "rope_scaling": {"rope_type": "yarn", "factor": 4},
             "max_model_len": 8192}


@contextlib.asynccontextmanager
async def real_api(model: dict, engine: dict | None = None):
    """The OpenAI app over a real Engine built from app args, as a replica builds it."""
    args = parse_args({"model": model, "engine": engine or {}})
    eng, tok, cfg = build_engine(args)
    info = ModelInfo.from_config(cfg, args.model.id)
    backend = RecordingBackend(eng, args.limits.retry_after_s)
    service = OpenAIService(info, tok, backend, args, frozenset(), StepRouter(Ladder(**LADDER)))
    await service.start()
    transport = httpx.ASGITransport(app=build_openai_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        try:
            yield c, backend, eng, tok, cfg
        finally:
            await service.stop()
            await eng.shutdown()


def _ids(tok, n: int) -> list[int]:
    """n token ids of ordinary code text."""
    ids = tok.encode("def f(x):\n    return x + 1\n" * (n // 8 + 1))
    assert len(ids) >= n
    return ids[:n]


async def test_tiny_coder_served_at_4x_its_context_from_app_args():
    async with real_api(STRETCHED, {"prefill_chunk_tokens": 1024}) as (c, backend, eng, tok, cfg):
        assert cfg.extra["trained_max_seq_len"] == 2048 and cfg.rope_scaling["factor"] == 4.0
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["max_model_len"] == 8192
        prompt = _ids(tok, 3000)  # past the trained 2048
        r = await c.post("/v1/completions", json={
            "model": "tiny-coder", "prompt": prompt, "max_tokens": 8, "denoising_steps": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 3000
        err = assert_error(await c.post("/v1/completions", json={
            "model": "tiny-coder", "prompt": _ids(tok, 8190), "max_tokens": 8}), 413, "prompt")
        assert err["code"] == "context_length_exceeded" and "8192" in err["message"]


async def test_deploy_past_the_rotary_context_fails_with_the_fix():
    with pytest.raises(ValueError, match="rope_scaling"):
        build_engine(parse_args({"model": {"source": "tiny-coder", "max_model_len": 8192}}))
    with pytest.raises(ValueError, match="rope_scaling"):
        parse_args({"model": {"source": "tiny-coder",
                              "rope_scaling": {"rope_type": "longrope", "factor": 4}}})


async def test_request_past_the_kv_pool_is_413_naming_it():
    async with real_api({"source": "tiny-coder"}, {"kv_pages": 4, "page_size": 16}) as \
            (c, backend, eng, tok, cfg):
        err = assert_error(await c.post("/v1/completions", json={
            "model": "tiny-coder", "prompt": _ids(tok, 100), "max_tokens": 32}), 413, "prompt")
        assert err["code"] == "context_length_exceeded" and "KV pages" in err["message"]


async def test_long_uncached_full_attention_rows_are_413(local_api):
    async with local_api(attention="full", engine_max_uncached_full_attention_tokens=100) as api:
        body = {"model": "test-coder", "prompt": list(range(10, 90)), "max_tokens": 32}
        err = assert_error(await api.client.post("/v1/completions", json=body), 413, "prompt")
        assert "100" in err["message"] and "full_cache" in err["message"]
        r = await api.client.post("/v1/completions", json={**body, "full_cache": "prefix"})
        assert r.status_code == 200, r.text
        r = await api.client.post("/v1/completions", json={**body, "max_tokens": 16})
        assert r.status_code == 200, r.text  # 80 + 16 <= 100


async def test_cfg_scale_is_400_for_a_family_without_guidance():
    async with real_api({"source": "tiny-coder"}) as (c, backend, eng, tok, cfg):
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["classifier_free_guidance"] is False
        err = assert_error(await c.post("/v1/completions", json={
            "model": "tiny-coder", "prompt": "def f():", "max_tokens": 8, "cfg_scale": 1.5}), 400)
        assert "classifier-free guidance" in err["message"]
        assert backend.requests == []  # refused before the engine


async def test_cfg_scale_through_the_api_on_llada(tmp_path):
    d = tmp_path / "llada"
    make_llada(d, seed=5)
    async with real_api({"source": str(d), "id": "llada"}) as (c, backend, eng, tok, cfg):
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["classifier_free_guidance"] is True
        texts = {}
        for scale in (0.0, 2.0):
            r = await c.post("/v1/completions", json={
                "model": "llada", "prompt": [5, 17, 23, 9, 31, 2, 44], "max_tokens": 16,
                "denoising_steps": 4, "temperature": 0, "ignore_eos": True, "cfg_scale": scale})
            assert r.status_code == 200, r.text
            req = backend.requests[-1]
            assert req.params.cfg_scale == scale
            want = generate(eng.net, req.prompt_ids, req.params, tokenizer=tok)
            texts[scale] = r.json()["choices"][0]["text"]
            assert texts[scale] == want.text
        assert texts[2.0] != texts[0.0]  # the guidance reached the step
        assert_error(await c.post("/v1/completions", json={
            "model": "llada", "prompt": "x", "max_tokens": 8, "cfg_scale": 1.0,
            "full_cache": "dual"}), 400)
