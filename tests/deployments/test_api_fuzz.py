"""Property-based: generated requests against every endpoint never get a 5xx, every refusal is
the OpenAI envelope, every answer has the OpenAI shape, and the server serves afterwards.

One app (in-process, mock engine, no step delay) per test; hypothesis' examples run on that
app's own event loop through `loop.run_until_complete`, since hypothesis drives a plain
function. derandomize=True: CI sees the same examples every run; 1,400 examples in all.
"""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MODEL_ID

EXAMPLES = 350  # per test; four tests

# any JSON value, nested a little
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)
TEXT = st.text(max_size=60) | st.sampled_from(["", "\x00", "a\ud800b", "\udfff", "\U0001f600",
                                              "def f(x):\n    ", "<|mask|>", "\u202e"])
SMALL_INT = st.integers(-3, 40) | st.sampled_from([0, 1, 1024, 2**31, 2**63, -2**63])
NUMBER = st.floats(-5, 5, allow_nan=False) | st.sampled_from([0, 1, 2, -0.0, 1e308])


def maybe(good, edge=JSON):
    """A field's value: eleven times in twelve one a client means, else an edge: out of range,
    the wrong type, garbage (a request has a handful of fields: about half come out valid)."""
    return st.integers(0, 11).flatmap(lambda k: edge if k == 0 else good)


COMMON = {
    "max_tokens": maybe(st.integers(1, 8), SMALL_INT | JSON), "n": maybe(st.integers(1, 3)),
    "seed": maybe(SMALL_INT), "stop": maybe(st.none() | st.lists(TEXT, max_size=6) | TEXT),
    "stream": maybe(st.booleans()), "temperature": maybe(st.floats(0, 2), NUMBER | JSON),
    "top_p": maybe(st.floats(0.01, 1), NUMBER | JSON),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "frequency_penalty": maybe(st.just(0), NUMBER), "presence_penalty": maybe(st.none(), NUMBER),
    "user": maybe(TEXT), "denoising_steps": maybe(st.integers(1, 32), SMALL_INT | JSON),
    "block_length": maybe(st.integers(1, 32), SMALL_INT | JSON),
    "quality": maybe(st.sampled_from(["auto", "max", "balanced", "fast"]), TEXT | JSON),
    "remasking": maybe(st.sampled_from(["low_confidence", "margin", "entropy", "random"])),
    "confidence_threshold": maybe(st.floats(0.05, 1), NUMBER | JSON),
    "diffusing": maybe(st.booleans()), "ignore_eos": maybe(st.booleans()),
    "full_cache": maybe(st.sampled_from(["none", "prefix", "dual"]), TEXT),
    "frobnicate": JSON,
}


def body(required: dict, optional: dict):
    """The required fields (usually right) and up to three optional ones."""
    return st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({**required, **{k: optional[k] for k in keys}}))


MODEL = maybe(st.just(MODEL_ID), st.sampled_from(["gpt-4", "", MODEL_ID + "\x00"]) | JSON)
MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant"]),
                   st.sampled_from(["tool", "x"]) | JSON)},
    optional={"content": maybe(TEXT, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"])}, optional={"text": TEXT}),
        max_size=3) | JSON), "name": maybe(TEXT)})
CHAT = body({"model": MODEL, "messages": maybe(st.lists(MESSAGE, min_size=1, max_size=4))}, {
    **COMMON, "max_completion_tokens": maybe(st.integers(1, 8), SMALL_INT),
    "logprobs": maybe(st.just(False), st.booleans() | JSON),
    "top_logprobs": maybe(st.just(0), SMALL_INT), "tools": maybe(st.just([]), JSON),
    "tool_choice": maybe(st.just("none"), st.sampled_from(["auto"]) | JSON),
    "logit_bias": maybe(st.just({}), JSON),
    "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(["text", "json"])})),
    "metadata": maybe(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
    "store": maybe(st.booleans()), "functions": JSON, "function_call": JSON})
PROMPT = TEXT | st.lists(TEXT, min_size=1, max_size=5) | \
    st.lists(st.integers(10, 300), min_size=1, max_size=6) | \
    st.lists(st.lists(st.integers(10, 300), min_size=1, max_size=4), min_size=1, max_size=3)
EDGE_PROMPT = st.lists(SMALL_INT, max_size=6) | st.lists(st.lists(SMALL_INT)) | JSON
COMPLETION = body({"model": MODEL, "prompt": maybe(PROMPT, EDGE_PROMPT)}, {
    **COMMON, "suffix": maybe(TEXT), "echo": maybe(st.booleans()),
    "best_of": maybe(st.just(1), SMALL_INT), "logprobs": maybe(st.none(), SMALL_INT),
    "logit_bias": maybe(st.none(), JSON)})
FIM = body({"model": MODEL, "prompt": maybe(TEXT)}, {**COMMON, "suffix": maybe(TEXT)})

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def check_response(r, stream: bool, seen: dict) -> None:
    seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 300:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif stream and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        for block in r.text.strip().split("\n\n")[:-1]:
            payload = json.loads(block.removeprefix("data: "))
            assert "choices" in payload or "error" in payload
    else:
        body = r.json()
        assert "choices" in body or body.get("object") in ("list", "model") or "status" in body


def run_fuzz(local_api, path: str, strategy) -> None:
    loop = asyncio.new_event_loop()
    manager = local_api(default_max_tokens=4)
    api = loop.run_until_complete(manager.__aenter__())
    seen: dict[int, int] = {}  # status -> count
    try:
        @FUZZ
        @given(body=strategy)
        def one(body):
            raw = json.dumps(body, ensure_ascii=True)  # lone surrogates as \\u escapes
            r = loop.run_until_complete(api.client.post(
                path, content=raw, headers={"content-type": "application/json"}))
            check_response(r, body.get("stream") is True, seen)

        one()
        # the examples ran, and they were not all refused: answers were checked too
        assert sum(seen.values()) >= EXAMPLES and seen.get(200, 0) >= EXAMPLES // 5, seen
        # still serving, and nothing left running in the engine
        ok = loop.run_until_complete(api.client.post("/v1/completions", json={
            "model": MODEL_ID, "prompt": "x", "max_tokens": 4}))
        assert ok.status_code == 200, ok.text
        while api.engine.stats().running or api.engine.stats().queued:
            loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.close()


def test_chat_completions_fuzz(local_api):
    run_fuzz(local_api, "/v1/chat/completions", CHAT)


def test_completions_fuzz(local_api):
    run_fuzz(local_api, "/v1/completions", COMPLETION)


def test_fim_completions_fuzz(local_api):
    run_fuzz(local_api, "/v1/fim/completions", FIM)


RAW = st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode),
                JSON.map(lambda v: json.dumps(v).encode()),
                st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": NaN}', b"\xff\xfe",
                                 b'{"model": "test-coder", "prompt": "x"' + b" " * 64]))
ROUTE = st.sampled_from([("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("POST", "/v1/fim/completions"), ("GET", "/v1/models"),
                         ("GET", f"/v1/models/{MODEL_ID}"), ("GET", "/v1/models/%00"),
                         ("GET", "/health"), ("PUT", "/v1/completions"),
                         ("POST", "/v1/../health"), ("GET", "/v1/nothing")])
CONTENT_TYPE = st.sampled_from(["application/json", "text/plain", "application/x-www-form-"
                                "urlencoded", "", "application/json; charset=latin-1"])


def test_raw_bodies_and_routes_fuzz(local_api):
    loop = asyncio.new_event_loop()
    manager = local_api(default_max_tokens=4)
    api = loop.run_until_complete(manager.__aenter__())
    seen: dict[int, int] = {}
    try:
        @FUZZ
        @given(route=ROUTE, body=RAW, content_type=CONTENT_TYPE)
        def one(route, body, content_type):
            method, path = route
            r = loop.run_until_complete(api.client.request(
                method, path, content=body if method != "GET" else None,
                headers={"content-type": content_type} if content_type else {}))
            check_response(r, False, seen)

        one()
        assert sum(seen.values()) >= EXAMPLES, seen
        ok = loop.run_until_complete(api.client.get("/v1/models"))
        assert ok.status_code == 200
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.close()
