"""Fixtures for engine tests: a small real tokenizer, tiny random nets, and helpers that run
requests through an Engine and check them against model.sampling.generate."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import Engine, EngineConfig
from engine.types import EngineStats, Event, Finished, GenerationRequest, TextDelta
from model.config import ModelConfig
from model.data import python_corpus, stdlib_dir
from model.sampling import SamplingParams, generate
from model.tokenizer import Tokenizer
from model.transformer import DiffusionTransformer


def small_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on the stdlib's json package (seconds; 400 tokens keeps the
    vocabulary work of every step small)."""
    return Tokenizer.train(python_corpus(stdlib_dir() / "json").values(), vocab_size=400)


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return small_tokenizer()


def tiny_config(tok: Tokenizer, **overrides) -> ModelConfig:
    base = dict(name="engine-test", vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                n_kv_heads=2, mlp_hidden=128, max_seq_len=512, mask_id=tok.mask_id,
                eos_id=tok.eos_id, pad_id=tok.pad_id, eot_id=tok.eot_id)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_net(cfg: ModelConfig, seed: int = 0, dtype=torch.float64) -> DiffusionTransformer:
    """A random net with non-zero adaLN (so the noise level t matters). float64 by default: the
    engine batches rows that the reference runs alone, and in float64 the rounding differences
    of other shapes (~1e-16) cannot flip a commit decision, so tokens must be equal exactly.
    float32 closeness is pinned separately (test_kv_pool, test_engine_reference)."""
    torch.manual_seed(seed)
    net = DiffusionTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(dtype).eval()


@pytest.fixture(scope="module")
def bc_net(tok):
    """Block-causal, time-conditioned (tiny-coder's layout)."""
    return tiny_net(tiny_config(tok))


@pytest.fixture(scope="module")
def full_net(tok):
    """Full attention, no time conditioning (LLaDA's layout)."""
    return tiny_net(tiny_config(tok, attention="full", time_conditioning=False), seed=1)


def make_engine(net, tok, **kw) -> Engine:
    return Engine(net, tok, net.cfg, EngineConfig(**kw))


def request(rid: str, prompt: list[int], suffix: list[int] | None = None, diffusing=False,
            **params) -> GenerationRequest:
    params.setdefault("stop_token_ids", [])  # random nets emit EOS anywhere; tests opt in
    return GenerationRequest(rid, prompt, SamplingParams(**params), suffix_ids=suffix,
                             diffusing=diffusing)


async def collect(engine: Engine, req: GenerationRequest, after: int = 0) -> list[Event]:
    """Submit once the engine has run `after` iterations (a later arrival), gather all events."""
    while engine.stats().iterations < after:
        await asyncio.sleep(0.001)
    return [e async for e in engine.submit(req)]


async def collect_staggered(engine: Engine, reqs: list[GenerationRequest],
                            every: int = 1) -> list[list[Event]]:
    """Request i arrives once the engine has run every * i iterations; the events of each."""
    return list(await asyncio.gather(*[collect(engine, r, after=every * i)
                                       for i, r in enumerate(reqs)]))


async def run_like_reference(engine: Engine, net, tok, reqs: list[GenerationRequest],
                             every: int = 1) -> EngineStats:
    """Run reqs staggered through the engine (collect_staggered), shut it down, and check every
    request against the reference. -> the engine's stats once all had finished."""
    results = await collect_staggered(engine, reqs, every)
    stats = engine.stats()
    await engine.shutdown()
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(net, tok, req, events)
    return stats


def streamed_tokens(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]


def streamed_text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def assert_like_reference(net, tok, req: GenerationRequest, events: list[Event]) -> None:
    ref = generate(net, req.prompt_ids, req.params, suffix_ids=req.suffix_ids, tokenizer=tok)
    fin = events[-1]
    assert isinstance(fin, Finished), fin
    assert fin.error is None
    assert streamed_tokens(events) == ref.tokens, req.request_id
    assert (fin.finish_reason, fin.steps, fin.text) == (ref.finish_reason, ref.steps, ref.text)
    assert fin.completion_tokens == len(ref.tokens)
    assert fin.prompt_tokens == len(req.prompt_ids)
    assert streamed_text(events) == fin.text
    assert sum(isinstance(e, Finished) for e in events) == 1
