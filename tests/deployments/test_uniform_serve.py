"""A DiffusionGemma checkpoint directory served through the OpenAI API (the real engine behind a
LocalBackend, no Ray): chat completions equal transformers' generate on the same weights and
seed, streaming and `diffusing` work, the step router's steps become max_denoising_steps, and
what the model cannot do gets a clear 400 (image parts, FIM, a masked model's knobs).
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import torch

from deployments.backends import LocalBackend
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.step_router import Ladder, StepRouter
from engine import Engine, EngineConfig
from engine.types import MASK_GLYPH, ModelInfo
from model import load_pretrained

from ..model.diffusion_gemma_ref import CANVAS, hf_model, save_checkpoint
from .conftest import app_args

pytest.importorskip("transformers.models.diffusion_gemma")
MODEL = "dg-tiny"
MESSAGES = [{"role": "user", "content": "w20 w31 w42 w53 w64 w75 w86"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = hf_model(seed=0)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight[14].mul_(2.5)
        hf.model.decoder.embed_tokens.weight[1].mul_(1.3)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("dg-serve"),
                        generation={"max_denoising_steps": 6, "entropy_bound": 2.0,
                                    "confidence_threshold": 3.0, "stability_threshold": 0})
    return hf, d


@contextlib.asynccontextmanager
async def served(d, ladder=(6, 3), load=None):
    """The OpenAI app over a real engine on checkpoint d; load: a FixedLoad the test sets."""
    net, tok, cfg = load_pretrained(d, progress=False)
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4))
    await engine.start()
    info = ModelInfo.from_config(cfg, MODEL)
    service = OpenAIService(info, tok, LocalBackend(engine), app_args(),
                            router=StepRouter(Ladder(list(ladder), [2.0] * (len(ladder) - 1),
                                                     control="thresholds", up_hold_s=0.0)))
    if load is not None:
        service.load_cache.fetch = load
    await service.start()
    transport = httpx.ASGITransport(app=build_openai_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, tok, service
    finally:
        await service.stop()
        await engine.shutdown()


def transformers_answer(hf, prompt_ids, seed, max_new, steps):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    torch.manual_seed(seed)
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new,
                      max_denoising_steps=steps,
                      sampler_config=EntropyBoundSamplerConfig(entropy_bound=2.0), t_min=0.4,
                      t_max=0.8, stability_threshold=0, confidence_threshold=3.0,
                      eos_token_id=1, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens[:tokens.index(1) + 1] if 1 in tokens else tokens[:max_new]


@pytest.mark.parametrize("seed", [3, 8])
async def test_chat_completion_equals_transformers_generate(ckpt, seed):
    hf, d = ckpt
    async with served(d) as (client, tok, _):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 2 * CANVAS, "seed": seed,
            "max_denoising_steps": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        want = transformers_answer(hf, tok.chat_prompt(MESSAGES), seed, 2 * CANVAS, 5)
        text = tok.decode([t for t in want if t != 1])
        assert body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == ("stop" if want[-1] == 1 else "length")
        assert body["usage"]["completion_tokens"] == len(want)
        assert body["usage"]["denoising_steps_per_block"] == 5  # the pin


async def test_streaming_and_diffusing(ckpt):
    _, d = ckpt
    async with served(d) as (client, tok, _):
        req = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2 * CANVAS, "seed": 4}
        plain = (await client.post("/v1/chat/completions", json=req)).json()
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**req, "stream": True, "diffusing": True}) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) async for line in r.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    canvases = [c["choices"][0]["diffusion"] for c in chunks
                if c["choices"] and c["choices"][0].get("diffusion")]
    assert canvases and any(MASK_GLYPH in c["canvas"] for c in canvases)


async def test_the_router_steps_are_the_canvas_steps_cap(ckpt):
    _, d = ckpt
    async with served(d, ladder=(4, 2)) as (client, _, _):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": CANVAS, "seed": 1})
        usage = r.json()["usage"]
        assert usage["denoising_steps_per_block"] == 4  # idle: the ladder's best rung
        assert 1 <= usage["denoising_steps"] <= 4  # one canvas, at most 4 steps
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["default_denoising_steps"] == 6  # generation_config.json
        assert models["diffusion_process"] == "uniform" and models["block_length"] == CANVAS


async def test_under_load_the_router_lowers_the_steps_cap(ckpt):
    """Load trades quality for latency for this family too: at a drain time past the
    threshold the router's second rung (3 steps per canvas) serves the request."""
    from autoscaling.load import ClusterLoad

    from .conftest import FixedLoad

    _, d = ckpt
    load = FixedLoad()
    async with served(d, ladder=(6, 3), load=load) as (client, _, service):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2 * CANVAS, "seed": 2}
        idle = (await client.post("/v1/chat/completions", json=body)).json()["usage"]
        load.load = ClusterLoad(replicas=1, drain_s=10.0, at=2.0)
        await service.load_cache.refresh()  # the router observes the new snapshot
        busy = (await client.post("/v1/chat/completions", json=body)).json()["usage"]
    assert idle["denoising_steps_per_block"] == 6
    assert busy["denoising_steps_per_block"] == 3 and busy["denoising_steps"] <= 2 * 3


@pytest.mark.parametrize("body,status,words", [
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "w20"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     400, "vision tower"),
    ({"remasking": "low_confidence"}, 400, "entropy bound"),
    ({"block_length": 4}, 400, "canvases of 8"),
    ({"confidence_threshold": 0.9}, 400, "confidence_threshold"),
    ({"max_denoising_steps": 3, "denoising_steps": 4}, 400, "disagree"),
])
async def test_what_the_model_cannot_do_is_a_clear_400(ckpt, body, status, words):
    _, d = ckpt
    async with served(d) as (client, _, _):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 8, **body})
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]


async def test_fim_is_refused(ckpt):
    _, d = ckpt
    async with served(d) as (client, _, _):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "w20 w21", "suffix": "w30", "max_tokens": 8})
        assert r.status_code == 400
        assert "fill-in-the-middle" in r.json()["error"]["message"]


def test_the_serve_config_example_validates_and_its_kv_budget_fits():
    """serve_config.diffusion-gemma.yaml is a valid Serve config whose args parse, and its KV
    budget holds max_num_seqs streams of a 4k prompt and a 512-token answer at the 26B shape."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from benchmarks.bench_diffusion_gemma import model_config
    from deployments.config import parse_args
    from model.diffusion_gemma import DiffusionGemma

    raw = yaml.safe_load((Path(__file__).parents[2] / "serve_config.diffusion-gemma.yaml")
                         .read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    args = parse_args(app.args)
    with torch.device("meta"):
        net = DiffusionGemma(model_config(tiny=False))
    per_token = 2 * 2 * sum(h * d for h, d in net.kv_shapes)  # K and V, bf16
    assert per_token == 225280  # the 220 KiB the comment states
    assert args.engine.kv_cache_bytes // per_token >= args.engine.max_num_seqs * (4096 + 512)
    assert args.ladder.steps == [48, 32, 16, 8]
    assert args.server.max_ongoing_requests == args.engine.max_num_seqs + args.engine.max_queued


async def test_the_replica_builds_its_engine_from_the_directory(ckpt):
    """deployments/replica.build_engine (what a ModelServer replica runs, Ray aside) on a
    DiffusionGemma directory: the uniform engine, max_model_len applied, a request served."""
    from deployments.config import parse_args
    from deployments.replica import build_engine
    from engine.types import Finished, GenerationRequest
    from model.sampling import SamplingParams

    _, d = ckpt
    args = parse_args({"model": {"source": str(d), "max_model_len": 256},
                       "engine": {"max_num_seqs": 2, "kv_cache_bytes": 4 << 20}})
    engine, tok, cfg = build_engine(args)
    assert engine.uniform and cfg.max_seq_len == 256
    events = [e async for e in engine.submit(GenerationRequest(
        "r", tok.encode("w20 w21"), SamplingParams(max_new_tokens=CANVAS, steps=3)))]
    await engine.shutdown()
    assert isinstance(events[-1], Finished) and events[-1].error is None
    assert 1 <= events[-1].steps <= 3
