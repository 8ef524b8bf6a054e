"""The embedded tiny-coder checkpoint, served by the engine. The weights keep improving while it
trains, so nothing here depends on what it writes, only on engine == reference."""

from __future__ import annotations

import asyncio

import torch

from engine import Engine, EngineConfig
from model.checkpoint import EMBEDDED_DIR, load_checkpoint

from .conftest import assert_like_reference, collect, request


def requests(tok):
    prompt = tok.encode("import os\n\n\ndef read_lines(path):\n")
    # the model's own stop tokens (EOS, end of turn) and a stop string, as a server sends them
    code = request("code", prompt, max_new_tokens=48, steps=8, block_length=32,
                   stop_token_ids=None, stop=["\ndef "])
    chat = request("chat", tok.chat_prompt([{"role": "user", "content": "Sort a list."}]),
                   max_new_tokens=16, steps=4, block_length=16, stop_token_ids=None)
    return code, chat


async def test_tiny_coder_serves_one_request_at_serving_precision():
    """float32, alone in the batch: the same arithmetic as the reference, so the same tokens."""
    net, tok, cfg = load_checkpoint(EMBEDDED_DIR)
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4, kv_cache_bytes=8 << 20))
    code, _ = requests(tok)
    events = await collect(engine, code)
    stats = engine.stats()
    await engine.shutdown()
    assert stats.kv_pages_total > 0 and stats.kv_pages_used == 0
    assert events[-1].finish_reason in ("stop", "length") and events[-1].completion_tokens > 0
    assert_like_reference(net, tok, code, events)


async def test_tiny_coder_batched_requests_equal_reference():
    """Two requests in one batch, weights in float64 so that batching's rounding differences
    cannot flip a trained model's near-ties (float32 closeness: test_kv_pool)."""
    net, tok, cfg = load_checkpoint(EMBEDDED_DIR, dtype=torch.float64)
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4))
    code, chat = requests(tok)
    first, second = await asyncio.gather(collect(engine, code), collect(engine, chat))
    await engine.shutdown()
    assert_like_reference(net, tok, code, first)
    assert_like_reference(net, tok, chat, second)
