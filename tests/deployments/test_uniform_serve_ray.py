"""DiffusionGemma on real Ray Serve: the app built from serve_config-style args (what `serve run`
deploys) serves a tiny DiffusionGemma checkpoint directory; streamed chat completions from
several concurrent clients (continuous batching in the replica's engine) equal transformers'
generate on the same weights and seeds, and the `diffusing` stream shows intermediate canvases.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from ..model.diffusion_gemma_ref import CANVAS, hf_model, hf_tokenizer, save_checkpoint
from .test_uniform_serve import MESSAGES, transformers_answer

pytestmark = pytest.mark.slow
pytest.importorskip("transformers.models.diffusion_gemma")
APP, PREFIX, MODEL = "dg-e2e", "/dg", "dg-e2e"


@pytest.fixture(scope="module")
def served(ray_serve, tmp_path_factory):
    from ray import serve

    from deployments.app import build_app

    hf = hf_model(seed=0)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight[14].mul_(2.5)
        hf.model.decoder.embed_tokens.weight[1].mul_(1.3)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("dg-e2e"),
                        generation={"max_denoising_steps": 6, "entropy_bound": 2.0,
                                    "confidence_threshold": 3.0, "stability_threshold": 0})
    args = {"model": {"source": str(d), "id": MODEL, "device": "cpu"},
            "engine": {"max_num_seqs": 4, "max_queued": 16},
            "ladder": {"steps": [5, 3], "thresholds_s": [30.0], "refresh_s": 0.25},
            "limits": {"default_max_tokens": CANVAS},
            "auth": {"api_keys_env": None},
            "server": {"num_cpus": 1, "max_ongoing_requests": 20,
                       "graceful_shutdown_timeout_s": 5, "drain_timeout_s": 2}}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    try:
        yield hf, f"{ray_serve.http_url}{PREFIX}"
    finally:
        serve.delete(APP)


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def test_concurrent_streams_equal_transformers(served):
    hf, url = served

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            bodies = [{"model": MODEL, "messages": MESSAGES, "max_tokens": 2 * CANVAS,
                       "seed": s, "max_denoising_steps": 5, "stream": True,
                       "diffusing": s == 3} for s in (3, 8, 11)]
            return await asyncio.gather(*[_stream(c, b) for b in bodies])

    results = asyncio.run(run())
    tok = hf_tokenizer()  # the checkpoint's tokenizer, as the server loads it
    prompt = tok.chat_prompt(MESSAGES)
    for seed, (text, _) in zip((3, 8, 11), results, strict=True):
        want = transformers_answer(hf, prompt, seed, 2 * CANVAS, 5)
        assert text == tok.decode([t for t in want if t != 1]), seed
    canvases = [c["choices"][0].get("diffusion") for c in results[0][1] if c["choices"]]
    assert any(canvases)  # the diffusing stream's intermediate canvases
