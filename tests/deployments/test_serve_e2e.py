"""End to end on real Ray Serve, through HTTP with the official `openai` client.

One application (ingress + model server + load board) is deployed for the whole module on the
session's shared Ray instance (tests/conftest.py), serving the embedded tiny-coder with the real
engine; greedy answers are compared with the reference sampler's (model.sampling.generate) run
in this process. Nothing here asserts on wall-clock time: waits poll /health until a state is
reached.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

APP_NAME = "dllm-e2e"
MODEL_ID = "dllm-e2e"
API_KEY = "e2e-secret"
LADDER_STEPS = [16, 8, 4, 2]
MAX_INFLIGHT = 20
MAX_NUM_SEQS = 16
MAX_QUEUED = 24  # > MAX_INFLIGHT: a flood of single requests never fills the engine queue


@dataclass
class E2E:
    url: str
    tokenizer: object
    net: object  # the same checkpoint, loaded in this process for the reference answers
    info: object  # engine.types.ModelInfo of the served model

    def reference(self, prompt_ids: list[int], max_tokens: int, steps: int) -> str:
        """The greedy answer of the reference sampler with the family's defaults."""
        from model.sampling import SamplingParams, generate

        params = SamplingParams(max_new_tokens=max_tokens, steps=steps,
                                block_length=self.info.block_length,
                                remasking=self.info.remasking, temperature=0.0,
                                defer_token_ids=list(self.info.defer_token_ids),
                                suppress_token_ids=list(self.info.suppress_token_ids))
        return generate(self.net, prompt_ids, params, tokenizer=self.tokenizer).text

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0,
                                  timeout=300)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300,
                            headers={"authorization": f"Bearer {API_KEY}"})

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def wait_for(self, what: str, pred, max_s: float = 180.0) -> dict:
        """Poll /health until pred(body); a hang guard, not a performance assertion."""
        deadline = time.monotonic() + max_s
        while True:
            body = self.health()
            if pred(body):
                return body
            if time.monotonic() > deadline:
                pytest.fail(f"never reached: {what}; last /health: {body}")
            time.sleep(0.1)

    def wait_idle(self) -> None:
        self.wait_for("an idle cluster at the best rung", lambda h: h["rung"] == 0 and
                      h["inflight"] == 0 and h["load"]["running"] == 0 and
                      h["load"]["queued"] == 0)


@pytest.fixture(scope="module")
def e2e(ray_serve, tmp_path_factory) -> E2E:
    from ray import serve

    from deployments.app import build_app
    from engine.types import ModelInfo
    from model.checkpoint import EMBEDDED_DIR
    from model.loaders import load_pretrained

    # No fallback: a checkout whose embedded model cannot load fails here, loudly.
    net, tokenizer, cfg = load_pretrained(str(EMBEDDED_DIR))
    tmp = tmp_path_factory.mktemp("e2e")
    keys = tmp / "keys"
    keys.write_text(API_KEY + "\n")
    args = {
        "model": {"source": str(EMBEDDED_DIR), "id": MODEL_ID, "device": "cpu"},
        "engine": {"max_num_seqs": MAX_NUM_SEQS, "max_queued": MAX_QUEUED},
        # The drain-time ladder, so the rung follows the load snapshot this test reads back;
        # the default latency-target controller (which also counts requests admitted since the
        # snapshot) is exercised under real load by tests/autoscaling/test_autoscale_integration.
        "ladder": {"steps": LADDER_STEPS, "control": "thresholds",
                   "thresholds_s": [1.0, 2.0, 4.0], "up_hold_s": 1.0, "refresh_s": 0.25},
        "limits": {"default_max_tokens": 32, "max_inflight": MAX_INFLIGHT, "retry_after_s": 2},
        "auth": {"api_keys_env": None, "api_keys_file": str(keys)},
        "server": {"num_cpus": 1, "routing_stats_period_s": 0.5, "max_ongoing_requests": 64,
                   "graceful_shutdown_timeout_s": 5, "drain_timeout_s": 2},
    }
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    env = E2E(url=ray_serve.http_url, tokenizer=tokenizer, net=net,
              info=ModelInfo.from_config(cfg, MODEL_ID))
    env.wait_for("the load snapshot", lambda h: h["status"] == "ok")
    yield env
    serve.delete(APP_NAME)


def heavy_body(**kw) -> dict:
    """A request that keeps a slot busy until it is cancelled (512 tokens, 32 steps/block)."""
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 512, "denoising_steps": 32, "ignore_eos": True, "stream": True, **kw}


async def hold_streams(url: str, bodies: list[dict]) -> list[asyncio.Task]:
    """Open streaming requests that nobody reads to the end; cancel the tasks to disconnect."""

    async def one(body):
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            async with c.stream("POST", "/v1/chat/completions", json=body,
                                headers={"authorization": f"Bearer {API_KEY}"}) as r:
                async for _ in r.aiter_lines():
                    pass

    return [asyncio.create_task(one(b)) for b in bodies]


async def disconnect(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_async(e2e: E2E, what: str, pred) -> dict:
    return await asyncio.to_thread(e2e.wait_for, what, pred)


# --- the API through the openai client --------------------------------------------------------
def test_models(e2e):
    c = e2e.client()
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert c.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_chat(e2e):
    c = e2e.client()
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=20)
    assert raw.headers["x-denoising-steps"] == "16"
    r = raw.parse()
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 20 or choice.finish_reason == "stop"
    assert r.usage.model_extra["denoising_steps_per_block"] == 16
    assert r.usage.model_extra["denoising_steps"] >= 1
    prompt = e2e.tokenizer.chat_prompt([{"role": "user", "content": "def add(a, b):"}])
    assert r.usage.prompt_tokens == len(prompt)
    assert choice.message.content == e2e.reference(prompt, 20, 16)
    # n choices fan out to n engine requests from one HTTP request
    several = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}],
                                        max_tokens=8, n=3, temperature=0.9, seed=5,
                                        extra_body={"ignore_eos": True})
    assert [ch.index for ch in several.choices] == [0, 1, 2]
    assert several.usage.completion_tokens == 24


def test_streaming_chat(e2e):
    c = e2e.client()
    messages = [{"role": "user", "content": "import os"}]
    pinned = {"ignore_eos": True, "denoising_steps": 16}  # the router may move between calls
    full = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=40,
                                     extra_body=pinned)
    stream = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=40,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body=pinned)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content  # greedy: streaming changes nothing
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert [ch.choices[0].finish_reason for ch in chunks
            if ch.choices and ch.choices[0].finish_reason] == ["length"]


def test_completions_and_fim_both_ways(e2e):
    c = e2e.client()
    r = c.completions.create(model=MODEL_ID, prompt="def fib(n):", max_tokens=16)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    prefix, suffix = "def area(r):\n    ", "\n    return a\n"
    legacy = c.completions.create(model=MODEL_ID, prompt=prefix, suffix=suffix, max_tokens=12,
                                  extra_body={"denoising_steps": 8})
    with e2e.http() as h:
        mercury = h.post("/v1/fim/completions", json={
            "model": MODEL_ID, "prompt": prefix, "suffix": suffix, "max_tokens": 12,
            "denoising_steps": 8})
    assert mercury.status_code == 200, mercury.text
    assert mercury.json()["choices"][0]["text"] == legacy.choices[0].text
    assert legacy.choices[0].text == e2e.reference(e2e.tokenizer.fim_prompt(prefix, suffix), 12, 8)


async def test_sixteen_concurrent_requests_all_answered(e2e):
    async with e2e.async_client() as c:
        async def one(i):
            return await c.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": f"task {i}"}],
                max_tokens=16, extra_body={"ignore_eos": True})

        results = await asyncio.gather(*[one(i) for i in range(16)])
    assert len(results) == 16
    assert all(r.choices[0].finish_reason == "length" for r in results)
    assert all(r.usage.completion_tokens == 16 for r in results)
    assert len({r.id for r in results}) == 16


# --- errors -----------------------------------------------------------------------------------
def test_error_statuses(e2e):
    c = e2e.client()
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        e2e.client(key="wrong").chat.completions.create(model=MODEL_ID, messages=msgs)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-4o", messages=msgs)
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as big:
        c.completions.create(model=MODEL_ID, prompt="x = 1\n" * 3000, max_tokens=4)
    assert big.value.status_code == 413
    with e2e.http() as h:
        r = h.post("/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = h.get("/v1/engines")
        assert r.status_code == 404 and "error" in r.json()
        assert h.get("/health").status_code == 200


# --- load: router, disconnects, overload ------------------------------------------------------
async def test_router_uses_fewer_steps_under_load_and_recovers(e2e):
    await asyncio.to_thread(e2e.wait_idle)
    c = e2e.client()

    def steps_of(**kw) -> int:
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "q"}], max_tokens=4,
            extra_body=kw)
        return int(raw.headers["x-denoising-steps"])

    assert await asyncio.to_thread(steps_of) == LADDER_STEPS[0]
    tasks = await hold_streams(e2e.url, [heavy_body() for _ in range(8)])
    try:
        loaded = await wait_async(e2e, "the router to leave the best rung",
                                  lambda h: h["rung"] >= 1)
        assert loaded["load"]["drain_s"] >= 1.0
        steps_loaded = await asyncio.to_thread(steps_of)
        assert steps_loaded < LADDER_STEPS[0]
        assert await asyncio.to_thread(steps_of, quality="max") == LADDER_STEPS[0]
        assert await asyncio.to_thread(steps_of, denoising_steps=12) == 12
    finally:
        await disconnect(tasks)
    # back to the best rung once the load is gone (hysteresis: one rung per up_hold_s)
    await wait_async(e2e, "the router back at the best rung", lambda h: h["rung"] == 0)
    assert await asyncio.to_thread(steps_of) == LADDER_STEPS[0]


async def test_disconnects_free_slots_and_inflight_cap_is_429(e2e):
    await asyncio.to_thread(e2e.wait_idle)
    tasks = await hold_streams(e2e.url, [heavy_body() for _ in range(MAX_INFLIGHT)])
    try:
        await wait_async(e2e, f"{MAX_INFLIGHT} requests in flight",
                         lambda h: h["inflight"] == MAX_INFLIGHT)
        with pytest.raises(openai.RateLimitError) as rl:
            e2e.client().chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        # the cluster's drain time (20 long answers queued), not the configured 2 s
        assert 2 < int(rl.value.response.headers["retry-after"]) <= 60
        await wait_async(e2e, "the engine to be busy", lambda h: h["load"]["running"] > 0)
    finally:
        await disconnect(tasks)
    # every disconnected client's engine request is cancelled: slots and backlog go to zero
    await wait_async(e2e, "slots freed", lambda h: h["inflight"] == 0 and
                     h["load"]["running"] == 0 and h["load"]["queued"] == 0 and
                     h["load"]["token_backlog"] == 0)
    r = e2e.client().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_engine_queue_full_is_503_with_retry_after(e2e):
    await asyncio.to_thread(e2e.wait_idle)
    tasks = await hold_streams(e2e.url, [heavy_body(n=MAX_NUM_SEQS)])
    try:
        await wait_async(e2e, "a full step batch", lambda h: h["load"]["running"] == MAX_NUM_SEQS)
        queued = 0
        while queued < MAX_QUEUED:  # fill the queue with n > 1 requests (one in-flight slot each)
            n = min(16, MAX_QUEUED - queued)
            tasks += await hold_streams(e2e.url, [heavy_body(n=n)])
            queued += n
            await wait_async(e2e, f"{queued} queued", lambda h, q=queued: h["load"]["queued"] == q)
        with pytest.raises(openai.InternalServerError) as unavailable:
            e2e.client().chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert unavailable.value.status_code == 503
        assert int(unavailable.value.response.headers["retry-after"]) >= 1
    finally:
        await disconnect(tasks)
    await wait_async(e2e, "slots freed", lambda h: h["load"]["running"] == 0 and
                     h["load"]["queued"] == 0)
