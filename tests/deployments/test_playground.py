"""The playground page in a real headless browser (Debian's chromium driven by Playwright).

The API runs in-process under uvicorn on 127.0.0.1 over the real tiny-coder engine (no Ray):
three apps on one engine, the playground on without keys, on with a key, and off. The browser
tests skip when /usr/bin/chromium is missing (.ci/run installs it). Set
DLLM_PLAYGROUND_SCREENSHOT=path.png to keep the mid-denoise screenshot (the README's picture).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

import engine
from deployments.backends import LocalBackend
from deployments.config import parse_args
from deployments.ingress import build_openai_app
from deployments.openai_service import OpenAIService
from engine.types import MASK_GLYPH, ModelInfo
from model.loaders import load_pretrained

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="chromium is not installed (apt-get install chromium)")
KEY = "playground-test-key"
PROMPT = "def fibonacci(n):\n"
MAX_TOKENS = 64  # two 32-token blocks: 32 canvases at the default 16 steps per block


class LiveServers:
    """uvicorn servers for several app configurations over one engine, in a background loop."""

    CONFIGS = {"open": (True, frozenset()), "keyed": (True, frozenset({KEY})),
               "off": (False, frozenset())}

    def __init__(self):
        self.urls: dict[str, str] = {}
        self._ready = threading.Event()
        self._servers: list[uvicorn.Server] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LiveServers:
        self._thread.start()
        if not self._ready.wait(120) or self._error:
            raise RuntimeError(f"the test servers did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        net, tok, cfg = load_pretrained("tiny-coder")
        eng = engine.Engine(net, tok, cfg, engine.EngineConfig(max_num_seqs=4))
        info = ModelInfo.from_config(cfg, "tiny-coder")
        services, tasks = [], []
        for name, (playground, keys) in self.CONFIGS.items():
            args = parse_args({"ingress": {"playground": playground}})
            service = OpenAIService(info, tok, LocalBackend(eng), args, api_keys=keys)
            await service.start()
            services.append(service)
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.urls[name] = f"http://127.0.0.1:{sock.getsockname()[1]}"
            server = uvicorn.Server(uvicorn.Config(build_openai_app(service), log_level="warning",
                                                   lifespan="off"))
            self._servers.append(server)
            tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(s.started for s in self._servers):
            await asyncio.sleep(0.05)
        self._ready.set()
        await asyncio.gather(*tasks)
        for service in services:
            await service.stop()
        await eng.shutdown()


@pytest.fixture(scope="module")
def servers():
    live = LiveServers().start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    pg = context.new_page()
    pg.set_default_timeout(20_000)  # a whole answer takes ~3 s at the default pace
    pg.problems = []  # console errors and uncaught exceptions
    pg.on("console", lambda m: pg.problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.problems.append(str(e)))
    yield pg
    context.close()


# Records every distinct text the generated region shows, and the text of each span the page
# marked as committed at that step, as a person watching would see them.
WATCH = """() => {
  window.seen = []; window.freshTexts = [];
  const gen = document.getElementById('gen');
  new MutationObserver(() => {
    const text = gen.textContent;
    if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
    for (const s of gen.querySelectorAll('.fresh')) window.freshTexts.push(s.textContent);
  }).observe(gen, {childList: true, subtree: true, characterData: true});
}"""


def api_answer(url: str, **extra) -> dict:
    body = {"model": "tiny-coder", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def generate(page) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.click("#run")


@needs_chromium
def test_playground_watches_the_canvas_denoise(servers, page, tmp_path):
    url = servers.urls["open"]
    page.goto(f"{url}/playground")
    page.wait_for_selector("#model option[value='tiny-coder']", state="attached")
    assert "tiny-coder" in page.text_content("#card")
    page.evaluate(WATCH)

    generate(page)
    # mid-denoise: some text committed, some positions still masked
    page.wait_for_function(f"() => window.seen.filter(t => t.includes('{MASK_GLYPH}') && "
                           f"t.replace(/{MASK_GLYPH}/g, '').trim()).length >= 3")
    shot = Path(os.environ.get("DLLM_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    page.wait_for_function("() => document.getElementById('phase').textContent"
                           ".startsWith('done')")

    want = api_answer(url)
    seen = page.evaluate("window.seen")
    canvases = [t for t in seen if MASK_GLYPH in t]
    assert len(set(canvases)) >= 2, seen
    final = page.text_content("#gen")
    assert final == want["choices"][0]["text"]
    assert seen[-1] == final and MASK_GLYPH not in final
    fresh = page.evaluate("window.freshTexts")
    assert fresh and all(t and MASK_GLYPH not in t for t in fresh)

    def stat(name: str) -> float:
        return float(page.get_attribute(f"#stat-{name}", "data-value"))

    usage = want["usage"]
    assert stat("steps") == usage["denoising_steps_per_block"] == 16
    assert stat("passes") == usage["denoising_steps"]
    assert stat("tokens") == usage["completion_tokens"]
    assert stat("tpp") == pytest.approx(usage["completion_tokens"] / usage["denoising_steps"])
    assert stat("tps") == pytest.approx(stat("tokens") / stat("elapsed"))
    assert page.text_content("#stat-steps") == "16"
    assert page.text_content("#stat-passes") == str(usage["denoising_steps"])

    # the live panel: what /health says, refreshed every second
    health = httpx.get(f"{url}/health").json()
    assert page.text_content("#h-replicas") == str(health["load"]["replicas"]) == "1"
    assert page.text_content("#h-steps") == str(health["steps"])
    assert page.text_content("#health-status") == "ok"
    before = page.text_content("#h-updated")
    page.wait_for_function(f"() => document.getElementById('h-updated').textContent "
                           f"!== {before!r}", timeout=5_000)
    assert page.is_hidden("#error")
    assert page.problems == []


def open_in_mode(page, url: str, mode: str) -> None:
    """The page, loaded, in `mode`, canvases shown as they arrive."""
    page.goto(f"{url}/playground")
    page.wait_for_selector("#model option[value='tiny-coder']", state="attached")
    page.select_option("#mode", mode)
    page.select_option("#pace", "0")


def generate_to_the_end(page) -> None:
    generate(page)
    page.wait_for_function("() => document.getElementById('phase').textContent"
                           ".startsWith('done')")


@needs_chromium
def test_playground_fim_mode_shows_prefix_and_suffix(servers, page):
    url = servers.urls["open"]
    open_in_mode(page, url, "fim")
    assert page.is_visible("#suffix")
    page.fill("#suffix", "\n    return a\n")
    generate_to_the_end(page)
    want = api_answer(url, suffix="\n    return a\n")["choices"][0]["text"]
    assert page.text_content("#gen") == want
    assert page.text_content("#before") == PROMPT
    assert page.text_content("#after") == "\n    return a\n"
    assert page.problems == []


@needs_chromium
def test_playground_chat_mode(servers, page):
    url = servers.urls["open"]
    open_in_mode(page, url, "chat")
    generate_to_the_end(page)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-coder", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS, "temperature": 0})
    assert page.text_content("#gen") == r.json()["choices"][0]["message"]["content"]
    assert page.text_content("#before") == ""
    assert page.get_attribute("#stat-passes", "data-value") == \
        str(r.json()["usage"]["denoising_steps"])
    assert page.problems == []


@needs_chromium
def test_playground_asks_for_the_api_key(servers, page):
    url = servers.urls["keyed"]
    page.goto(f"{url}/playground")  # the page itself is public
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "401" in error.text_content() and "API key" in error.text_content()
    assert page.locator("#model option").count() == 0
    generate(page)  # without the key generation fails too, visibly
    page.wait_for_function("() => document.getElementById('phase').textContent === 'failed'")
    assert "401" in error.text_content()

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model option[value='tiny-coder']", state="attached")
    assert page.is_hidden("#error")
    page.select_option("#pace", "0")
    generate(page)
    page.wait_for_function("() => document.getElementById('phase').textContent"
                           ".startsWith('done')")
    assert page.text_content("#gen") == api_answer(url)["choices"][0]["text"]
    assert page.evaluate("sessionStorage.getItem('dllm-playground-key')") == KEY
    # only the failed loads of the 401s reached the console: no script error
    assert all("401" in p for p in page.problems), page.problems


def test_playground_routes(servers):
    keyed, off = servers.urls["keyed"], servers.urls["off"]
    r = httpx.get(f"{off}/playground")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{off}/playground/playground.js").status_code == 404

    page = httpx.get(f"{keyed}/playground")  # public even with keys: navigation has no header
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'data-auth="required"' in page.text and "<script>" not in page.text
    js = httpx.get(f"{keyed}/playground/playground.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text  # model output goes in as text only
    missing = httpx.get(f"{keyed}/playground/..%2Fplayground.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
