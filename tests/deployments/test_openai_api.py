"""The OpenAI API over a local MockEngine (no Ray): protocol, streaming, FIM, steps, errors."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from benchmarks.mock_engine import MockEngine, mock_steps_used
from engine.types import MASK_GLYPH

from .conftest import MODEL_ID


def words_text(words: list[str]) -> str:
    return "".join(" " + w for w in words)


def sse_events(body: str) -> list:
    """Parse an SSE body into JSON payloads; the final [DONE] is returned as the string."""
    out = []
    for block in body.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_body(content: str = "write a function", **kw) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], **kw}


def assert_error(r, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


# --- models -------------------------------------------------------------------------------------
async def test_models_list_and_get(local_api):
    async with local_api() as api:
        r = await api.client.get("/v1/models")
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == [MODEL_ID]
        card = body["data"][0]
        assert card["object"] == "model" and card["max_model_len"] == 512
        r = await api.client.get(f"/v1/models/{MODEL_ID}")
        assert r.status_code == 200 and r.json()["id"] == MODEL_ID
        err = assert_error(await api.client.get("/v1/models/gpt-4"), 404)
        assert err["code"] == "model_not_found"


# --- chat ---------------------------------------------------------------------------------------
async def test_chat_completion_text_usage_and_steps(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=40))
        assert r.status_code == 200, r.text
        body = r.json()
        prompt = api.tokenizer.chat_prompt([{"role": "user", "content": "write a function"}])
        expected = MockEngine.expected_words(prompt, 40)
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant",
                                                 "content": words_text(expected)}
        assert body["choices"][0]["finish_reason"] == "length"
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        assert usage["completion_tokens"] == 40
        assert usage["total_tokens"] == len(prompt) + 40
        # idle cluster: the best rung (16 steps per block) on 32-token blocks: 16 + 8 (8 tokens)
        assert usage["denoising_steps_per_block"] == 16
        assert usage["denoising_steps"] == mock_steps_used(40, 16, 32) == 24
        assert r.headers["x-denoising-steps"] == "16"
        assert api.backend.requests[0].prompt_ids == prompt


async def test_chat_streaming_matches_non_streaming(local_api):
    async with local_api() as api:
        full = (await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=70))).json()
        r = await api.client.post("/v1/chat/completions", json=chat_body(
            max_tokens=70, stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-denoising-steps"] == "16"
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"])
        assert text == full["choices"][0]["message"]["content"]
        # one delta per committed block: 70 tokens in 32-token blocks = 3 deltas
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
                   ) == 3
        finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
        assert [f["choices"][0]["finish_reason"] for f in finals] == ["length"]
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 70
        assert usage_chunk["usage"]["denoising_steps"] == full["usage"]["denoising_steps"]


async def test_stream_without_include_usage_has_no_usage_chunk(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=8,
                                                                          stream=True))
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert all("usage" not in c for c in events[:-1])


async def test_diffusing_stream_shows_canvases(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(
            max_tokens=8, stream=True, diffusing=True, denoising_steps=4))
        chunks = sse_events(r.text)[:-1]
        canvases = [c["choices"][0]["diffusion"] for c in chunks
                    if c["choices"] and c["choices"][0].get("diffusion")]
        assert [c["step"] for c in canvases] == [1, 2, 3, 4]
        assert MASK_GLYPH in canvases[0]["canvas"]
        assert MASK_GLYPH not in canvases[-1]["canvas"]


async def test_n_choices_seed_and_temperature(local_api):
    async with local_api() as api:
        body = chat_body(max_tokens=6, n=3, temperature=0.8, seed=7)
        a = (await api.client.post("/v1/chat/completions", json=body)).json()
        b = (await api.client.post("/v1/chat/completions", json=body)).json()
        texts = [c["message"]["content"] for c in a["choices"]]
        assert [c["index"] for c in a["choices"]] == [0, 1, 2]
        assert len(set(texts)) == 3  # different seeds per choice
        assert texts == [c["message"]["content"] for c in b["choices"]]  # same seed, same text
        assert a["usage"]["completion_tokens"] == 18
        greedy = (await api.client.post("/v1/chat/completions",
                                        json=chat_body(max_tokens=6, n=2))).json()
        assert len({c["message"]["content"] for c in greedy["choices"]}) == 1
        seeds = [r.params.seed for r in api.backend.requests[:3]]
        assert seeds == [7, 8, 9]


async def test_stop_sequence_cuts_text(local_api):
    async with local_api() as api:
        prompt = api.tokenizer.chat_prompt([{"role": "user", "content": "write a function"}])
        words = MockEngine.expected_words(prompt, 20)
        stop = " " + words[5]
        cut = words_text(words).index(stop)
        r = await api.client.post("/v1/chat/completions",
                                  json=chat_body(max_tokens=20, stop=[stop]))
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == words_text(words)[:cut]
        assert choice["finish_reason"] == "stop"
        assert api.backend.requests[0].params.stop == [stop]


async def test_max_completion_tokens_and_defaults(local_api):
    async with local_api(default_max_tokens=12) as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=5))
        assert r.json()["usage"]["completion_tokens"] == 5
        r = await api.client.post("/v1/chat/completions", json=chat_body())
        assert r.json()["usage"]["completion_tokens"] == 12
        r = await api.client.post("/v1/chat/completions", json=chat_body(
            max_tokens=3, max_completion_tokens=4))
        assert_error(r, 400)


async def test_sampling_parameters_reach_the_engine(local_api):
    async with local_api() as api:
        await api.client.post("/v1/chat/completions", json=chat_body(
            max_tokens=4, temperature=0.5, top_p=0.9, seed=3, block_length=8, remasking="margin",
            confidence_threshold=0.9, denoising_steps=5))
        p = api.backend.requests[0].params
        assert (p.temperature, p.top_p, p.seed, p.block_length, p.remasking,
                p.confidence_threshold, p.steps) == (0.5, 0.9, 3, 8, "margin", 0.9, 5)


async def test_full_cache_default_and_override_reach_the_engine(local_api):
    """The server default (app arg engine.full_attention_cache -> ServiceSettings) goes into
    every request's SamplingParams; a request's own `full_cache` wins; a bad one is a 400."""
    async with local_api(attention="full", full_attention_cache="prefix") as api:
        c = api.client
        assert (await c.post("/v1/chat/completions", json=chat_body(max_tokens=4))).status_code \
            == 200
        r = await c.post("/v1/completions", json={"model": MODEL_ID, "prompt": "def f(",
                                                  "max_tokens": 4, "full_cache": "dual"})
        assert r.status_code == 200
        await c.post("/v1/chat/completions", json=chat_body(max_tokens=4, full_cache="none"))
        assert [r.params.full_cache for r in api.backend.requests] == ["prefix", "dual", "none"]
        n = len(api.backend.requests)
        err = assert_error(await c.post("/v1/chat/completions",
                                        json=chat_body(full_cache="suffix")), 400, "full_cache")
        assert err["type"] == "invalid_request_error"
        assert len(api.backend.requests) == n  # refused before the engine
    async with local_api(attention="full") as api:
        await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        assert api.backend.requests[0].params.full_cache == "none"  # the default approximates


def test_full_attention_cache_app_arg():
    from deployments.config import parse_args

    a = parse_args({"engine": {"full_attention_cache": "dual", "max_num_seqs": 4}})
    assert a.engine.full_attention_cache == "dual" and a.engine.max_num_seqs == 4
    with pytest.raises(ValueError, match="full_attention_cache"):
        parse_args({"engine": {"full_attention_cache": "sideways"}})


async def test_unknown_fields_are_ignored_with_a_log_line(local_api, caplog):
    async with local_api() as api:
        with caplog.at_level(logging.INFO, logger="deployments.protocol"):
            r = await api.client.post("/v1/chat/completions", json=chat_body(
                max_tokens=4, frobnicate=True, x_client_hint={"a": 1}))
        assert r.status_code == 200
        assert any("frobnicate" in rec.getMessage() and "x_client_hint" in rec.getMessage()
                   for rec in caplog.records)


async def test_developer_role_and_content_parts(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "max_tokens": 4, "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "},
                                             {"type": "text", "text": "there"}]}]})
        assert r.status_code == 200
        expected = api.tokenizer.chat_prompt([{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi there"}])
        assert api.backend.requests[0].prompt_ids == expected
        r = await api.client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert_error(r, 400, "messages")


# --- completions and FIM --------------------------------------------------------------------------
async def test_completion_plain_echo_and_batch(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "def add(a, b):", "max_tokens": 9})
        body = r.json()
        ids = api.tokenizer.encode("def add(a, b):")
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == words_text(MockEngine.expected_words(ids, 9))
        assert body["usage"]["prompt_tokens"] == len(ids)
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "x = ", "max_tokens": 2, "echo": True})
        assert r.json()["choices"][0]["text"].startswith("x = ")
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": ["a", "b"], "max_tokens": 2, "n": 2})
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": [20, 21, 22], "max_tokens": 3})
        assert r.json()["choices"][0]["text"] == words_text(
            MockEngine.expected_words([20, 21, 22], 3))


async def test_fim_block_causal_goes_in_the_prompt(local_api):
    async with local_api(attention="block_causal") as api:
        prefix, suffix = "def f(x):\n    ", "\n    return y\n"
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": prefix, "suffix": suffix, "max_tokens": 7})
        fim = api.tokenizer.fim_prompt(prefix, suffix)
        req = api.backend.requests[0]
        assert req.prompt_ids == fim and req.suffix_ids is None
        expected = words_text(MockEngine.expected_words(fim, 7))
        assert r.json()["choices"][0]["text"] == expected
        # Mercury-style endpoint: same request, same answer
        r2 = await api.client.post("/v1/fim/completions", json={
            "model": MODEL_ID, "prompt": prefix, "suffix": suffix, "max_tokens": 7})
        assert r2.status_code == 200
        assert r2.json()["choices"][0]["text"] == expected
        assert api.backend.requests[1].prompt_ids == fim


async def test_fim_full_attention_sends_the_suffix_after_the_canvas(local_api):
    async with local_api(attention="full") as api:
        prefix, suffix = "def f(x):\n    ", "\n    return y\n"
        r = await api.client.post("/v1/fim/completions", json={
            "model": MODEL_ID, "prompt": prefix, "suffix": suffix, "max_tokens": 5,
            "stream": True})
        assert sse_events(r.text)[-1] == "[DONE]"
        req = api.backend.requests[0]
        assert req.prompt_ids == api.tokenizer.encode(prefix)
        assert req.suffix_ids == api.tokenizer.encode(suffix)


async def test_completion_streaming(local_api):
    async with local_api() as api:
        r = await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "import os", "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        ids = api.tokenizer.encode("import os")
        assert text == words_text(MockEngine.expected_words(ids, 40))
        assert chunks[-1]["usage"]["completion_tokens"] == 40


# --- the step router through the API -------------------------------------------------------------
async def test_router_steps_follow_load_pins_and_quality(local_api):
    async with local_api(fixed_load=True) as api:
        async def steps(**kw):
            r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=4, **kw))
            assert r.status_code == 200, r.text
            assert int(r.headers["x-denoising-steps"]) == min(
                r.json()["usage"]["denoising_steps_per_block"], 32)
            return int(r.headers["x-denoising-steps"])

        assert await steps() == 16
        await api.set_load(2.5)  # past the second threshold: rung 2
        assert await steps() == 4
        assert await steps(quality="max") == 16
        assert await steps(quality="balanced") == 8  # never below the middle rung
        assert await steps(quality="fast") == 2
        assert await steps(denoising_steps=12) == 12  # a pin wins
        assert api.backend.routing[-1] == {"below_best": None}
        assert api.backend.routing[0] == {"below_best": False}
        assert api.backend.routing[1] == {"below_best": True}
        for _ in range(3):  # up_hold_s=0: back one rung per refresh once below the threshold
            await api.set_load(0.0)
        assert await steps() == 16


# --- errors ----------------------------------------------------------------------------------------
async def test_bad_requests_are_400_with_the_envelope(local_api):
    async with local_api() as api:
        c = api.client
        r = await c.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                         headers={"content-type": "application/json"})
        assert assert_error(r, 400)["code"] == "invalid_json"
        r = await c.post("/v1/chat/completions", content=b"[1, 2]",
                         headers={"content-type": "application/json"})
        assert_error(r, 400)
        assert_error(await c.post("/v1/chat/completions", json={"model": MODEL_ID}), 400,
                     "messages")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(temperature=5)), 400,
                     "temperature")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(top_p=0)), 400, "top_p")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(n=0)), 400, "n")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(max_tokens=0)), 400,
                     "max_tokens")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(stop=["a"] * 5)), 400,
                     "stop")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(quality="best")), 400,
                     "quality")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(remasking="x")), 400,
                     "remasking")
        assert_error(await c.post("/v1/chat/completions",
                                  json=chat_body(confidence_threshold=1.5)), 400,
                     "confidence_threshold")
        assert_error(await c.post("/v1/chat/completions", json=chat_body(logprobs=True)), 400)
        assert_error(await c.post("/v1/chat/completions", json=chat_body(
            tools=[{"type": "function", "function": {"name": "f"}}])), 400)
        assert_error(await c.post("/v1/chat/completions", json=chat_body(
            stream_options={"include_usage": True})), 400)
        assert_error(await c.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}), 400)
        assert_error(await c.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": [999999], "max_tokens": 2}), 400, "prompt")
        assert_error(await c.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "x", "best_of": 3}), 400)
        assert_error(await c.post("/v1/completions", json={"model": MODEL_ID, "prompt": []}), 400)
        assert_error(await c.post("/v1/chat/completions", json=chat_body(max_tokens=10_000)), 400,
                     "max_tokens")
        assert api.engine.stats().iterations == 0  # nothing reached the engine


async def test_unknown_model_and_route_are_404(local_api):
    async with local_api() as api:
        err = assert_error(await api.client.post("/v1/chat/completions",
                                                 json={**chat_body(), "model": "gpt-4o"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert_error(await api.client.get("/v1/nope"), 404)
        assert_error(await api.client.post("/v2/chat/completions", json=chat_body()), 404)


async def test_prompt_too_long_is_413(local_api):
    async with local_api() as api:
        long_text = "x = 1\n" * 400  # well over the 512-token context
        err = assert_error(await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": long_text, "max_tokens": 4}), 413)
        assert err["code"] == "context_length_exceeded"
        ids = api.tokenizer.encode("x = 1\n" * 40)
        assert len(ids) < 512
        assert_error(await api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "x = 1\n" * 40, "max_tokens": 512 - len(ids) + 1}), 413)


async def test_api_keys(local_api, tmp_path, monkeypatch):
    from deployments.ingress import load_api_keys

    monkeypatch.setenv("TEST_KEYS", "k1, k2")
    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\nk3\n")
    keys = load_api_keys("TEST_KEYS", str(keyfile))
    assert keys == {"k1", "k2", "k3"}
    async with local_api(api_keys=keys) as api:
        c = api.client
        err = assert_error(await c.get("/v1/models"), 401)
        assert err["type"] == "authentication_error"
        assert_error(await c.post("/v1/chat/completions", json=chat_body(),
                                  headers={"authorization": "Bearer nope"}), 401)
        # 401 comes before the body is even parsed
        assert_error(await c.post("/v1/chat/completions", content=b"{",
                                  headers={"content-type": "application/json"}), 401)
        r = await c.get("/v1/models", headers={"authorization": "Bearer k3"})
        assert r.status_code == 200
        r = await c.post("/v1/chat/completions", json=chat_body(max_tokens=2),
                         headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key


async def test_overload_429_inflight_cap(local_api):
    """Retry-After says the measured drain time once there is one, the configured value before."""
    async with local_api(mock={"step_delay_s": 0.05}, max_inflight=1, retry_after_s=3,
                         fixed_load=True) as api:
        slow = asyncio.create_task(api.client.post("/v1/chat/completions",
                                                   json=chat_body(max_tokens=64)))
        while api.service.inflight == 0:
            await asyncio.sleep(0.005)
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        err = assert_error(r, 429)
        assert r.headers["retry-after"] == "3"  # nothing measured: the configured value
        assert err["type"] == "rate_limit_error"
        await api.set_load(7.2)
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert_error(r, 429)
        assert r.headers["retry-after"] == "8"  # the drain time, rounded up
        assert (await slow).status_code == 200
        assert api.service.inflight == 0
        await api.set_load(0.0)
        assert (await api.client.post("/v1/chat/completions",
                                      json=chat_body(max_tokens=2))).status_code == 200


async def test_overload_429_cluster_drain_time(local_api):
    async with local_api(fixed_load=True, max_drain_s=10.0) as api:
        await api.set_load(25.0)
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        await api.set_load(0.5)
        assert (await api.client.post("/v1/chat/completions",
                                      json=chat_body(max_tokens=2))).status_code == 200


async def test_engine_queue_full_is_503(local_api):
    async with local_api(mock={"step_delay_s": 0.05, "max_num_seqs": 1, "max_queued": 1}) as api:
        first = asyncio.create_task(api.client.post("/v1/chat/completions",
                                                    json=chat_body(max_tokens=64)))
        while api.engine.stats().running == 0:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(api.client.post("/v1/chat/completions",
                                                     json=chat_body(max_tokens=64)))
        while api.engine.stats().queued == 0:
            await asyncio.sleep(0.005)
        r = await api.client.post("/v1/chat/completions", json=chat_body(max_tokens=2,
                                                                          stream=True))
        err = assert_error(r, 503)  # a status, not a 200 stream with an error inside
        assert "retry-after" in r.headers and err["type"] == "service_unavailable_error"
        assert (await first).status_code == 200 and (await second).status_code == 200


async def test_health(local_api):
    async with local_api() as api:
        r = await api.client.get("/health")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["steps"] == 16 and body["load"]["replicas"] == 1


# --- cancellation ----------------------------------------------------------------------------------
async def test_abandoned_stream_frees_the_engine_slot(local_api):
    """A client that goes away mid-stream: closing the response cancels the engine request."""
    async with local_api(mock={"step_delay_s": 0.01}) as api:
        from deployments.protocol import ChatCompletionRequest

        req = ChatCompletionRequest.model_validate(chat_body(max_tokens=400, stream=True))
        job = await api.service.make_job(req, "chat")
        streams, early = await api.service.start_stream(job)
        gen = api.service.stream(job, req.include_usage, streams, early, chat=True)
        await gen.__anext__()  # role chunk
        await gen.__anext__()  # first block
        assert api.engine.stats().running == 1
        await gen.aclose()
        streams.close()
        while api.engine.stats().running or api.engine.stats().queued:
            await asyncio.sleep(0.005)
        assert api.engine.stats().token_backlog == 0
