"""Token healing in the ingress: a text prompt ending in a whitespace token is sent without it,
the first generated token must start with it, and the client gets only what follows.

Mock engine: what reaches the engine. Real engine (tiny-coder, in-process): the answer a user
sees for a prompt ending in a newline, which without healing is empty (model/healing.py)."""

from __future__ import annotations

import pytest

from deployments.backends import LocalBackend
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from deployments.streams import unheal
from engine.types import Finished, ModelInfo, TextDelta

from .conftest import app_args

PROMPT = "def load(path):\n"


def ends_in_whitespace_token(tok, text: str) -> bool:
    last = tok.decode([tok.encode(text)[-1]])
    return bool(last) and not last.strip()


async def test_prompt_ending_in_whitespace_is_healed(local_api):
    async with local_api() as api:
        assert ends_in_whitespace_token(api.tokenizer, PROMPT)
        full = api.tokenizer.encode(PROMPT)
        r = await api.client.post("/v1/completions", json={
            "model": "test-coder", "prompt": PROMPT, "max_tokens": 8})
        assert r.status_code == 200
        sent = api.backend.requests[-1]
        assert sent.prompt_ids == full[:-1]
        healed = api.tokenizer.decode([full[-1]])
        first = sent.params.first_token_ids
        assert first and full[-1] in first
        assert all(api.tokenizer.decode([t]).startswith(healed) for t in first)
        assert r.json()["usage"]["prompt_tokens"] == len(full)  # the user's prompt, as sent


@pytest.mark.parametrize("body, settings", [
    ({"stop": ["\n"]}, {}),  # the healed text could match a stop string
    ({}, {"token_healing": False}),
    ({"prompt": "def load(path):"}, {}),  # nothing to heal
    ({"suffix": "    return x\n"}, {}),  # FIM prompts end in a sentinel token
])
async def test_not_healed(local_api, body, settings):
    async with local_api(**settings) as api:
        req = {"model": "test-coder", "prompt": PROMPT, "max_tokens": 8, **body}
        r = await api.client.post("/v1/completions", json=req)
        assert r.status_code == 200, r.text
        sent = api.backend.requests[-1]
        assert sent.params.first_token_ids is None
        if "suffix" not in body:
            assert sent.prompt_ids == api.tokenizer.encode(req["prompt"])


async def _events(*events):
    for e in events:
        yield e


@pytest.mark.parametrize("deltas, healed, want", [
    (["\n    return", " x"], "\n", ["    return", " x"]),
    (["\n", "  ", "  y"], "\n    ", ["", "", "y"]),  # the healed text spans three deltas
    (["", "\n\n", "z"], "\n", ["", "\n", "z"]),
])
async def test_unheal_strips_the_healed_text_once(deltas, healed, want):
    events = [TextDelta("r", d, [i]) for i, d in enumerate(deltas)]
    fin = Finished("r", "stop", 1, len(deltas), 1, text="".join(deltas))
    got = [e async for e in unheal(_events(*events, fin), healed)]
    assert [e.text for e in got[:-1]] == want
    assert got[-1].text == "".join(want)


async def test_tiny_coder_answers_a_prompt_ending_in_newline():
    import httpx

    from deployments.step_router import Ladder, StepRouter
    from engine import Engine, EngineConfig
    from model.checkpoint import EMBEDDED_DIR
    from model.loaders import load_pretrained

    if not (EMBEDDED_DIR / "config.json").exists():
        pytest.skip("tiny-coder weights are not in this checkout")
    net, tok, cfg = load_pretrained("tiny-coder")
    results = {}
    for healing in (True, False):
        engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=2))
        await engine.start()
        info = ModelInfo.from_config(cfg, "tiny-coder")
        service = OpenAIService(info, tok, LocalBackend(engine), app_args(token_healing=healing),
                                router=StepRouter(Ladder([8], [])))
        await service.start()
        transport = httpx.ASGITransport(app=build_openai_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/v1/completions", json={
                "model": "tiny-coder", "prompt": "def add(a, b):\n", "max_tokens": 32,
                "temperature": 0})
        await service.stop()
        await engine.shutdown()
        assert r.status_code == 200
        results[healing] = r.json()["choices"][0]["text"]
    # healed: an indented body, not a second newline in front of it; unhealed: nothing
    assert results[True].strip(), results
    assert results[True].startswith(" "), results
    assert not results[False].strip(), results
