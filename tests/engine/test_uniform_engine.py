"""The engine runs uniform diffusion (DiffusionGemma) as the reference sampler does: in mixed,
staggered batches of requests at different steps caps, entropy bounds, seeds, prompt lengths and
answer lengths, each request's tokens, steps, finish reason and text are those it gets alone
from model/uniform.generate_uniform. Randomness is per request (its own seeded generator), the
self-conditioning state lives per sequence, canvases are committed into the paged pool causally.

float64 weights, as the other engine reference tests: batching changes float rounding, and in
float64 it cannot move a logit across a draw's boundary. Also: the entropy-bound commit rule on
a masked model equals the reference sampler, FIM is refused, diffusing streams placeholders.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import Engine, EngineConfig
from engine.types import MASK_GLYPH, CanvasUpdate, Finished, GenerationRequest, TextDelta
from model.sampling import SamplingParams
from model.uniform import generate_uniform, uniform_params

from ..model.diffusion_gemma_ref import CANVAS, hf_tokenizer, random_net
from .conftest import collect, collect_staggered, make_engine, request, run_like_reference

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dg():
    return random_net(seed=0, stability_threshold=0, confidence_threshold=3.5), hf_tokenizer()


def dg_request(rid: str, prompt: list[int], diffusing: bool = False, **kw) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**kw), diffusing=diffusing)


def reference(net, tok, req: GenerationRequest):
    return generate_uniform(net, req.prompt_ids, uniform_params(net.cfg, req.params),
                            tokenizer=tok)


def check(net, tok, req, events):
    ref = reference(net, tok, req)
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.error is None, fin
    tokens = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    assert tokens == ref.tokens, req.request_id
    assert (fin.finish_reason, fin.steps, fin.text) == (ref.finish_reason, ref.steps, ref.text)
    assert fin.completion_tokens == len(ref.tokens)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == fin.text
    return ref


def mixed(prefix: str) -> list[GenerationRequest]:
    out = []
    for i in range(7):
        prompt = [(7 * i + j) % 150 + 5 for j in range([3, 15, 1, 9, 12, 6, 4][i])]
        out.append(dg_request(
            f"{prefix}{i}", prompt, max_new_tokens=[24, 5, 16, 20, 9, 24, 13][i],
            max_denoising_steps=[10, 2, 6, 4, 7, 3, 10][i],
            entropy_bound=[2.0, 0.3, 20.0, 1.0, 4.0, 0.5, 2.0][i], seed=40 + i,
            stop_token_ids=[] if i % 3 == 2 else None))
    return out


async def test_mixed_staggered_batch_equals_the_sampler(dg):
    """7 requests, at most 3 running: they arrive at different iterations, wait, join and leave
    between steps (while others are mid-canvas); each equals its lone reference."""
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=3))
    reqs = mixed("u")
    results = await collect_staggered(engine, reqs, every=2)
    stats = engine.stats()
    await engine.shutdown()
    refs = [check(net, tok, r, ev) for r, ev in zip(reqs, results, strict=True)]
    assert stats.kv_pages_used == 0  # every canvas's pages came back
    # not vacuous: early stops, EOS stops and length stops all occur
    assert any(r.finish_reason == "stop" for r in refs)
    assert any(r.finish_reason == "length" for r in refs)
    assert any(r.steps < req.params.max_denoising_steps * r.blocks
               for r, req in zip(refs, reqs, strict=True) if r.finish_reason == "length")


async def test_requests_alone_and_together_get_the_same_tokens(dg):
    """The same request beside different neighbours (and alone) gives the same tokens: the
    randomness is the request's own."""
    net, tok = dg
    a = dg_request("a", [5, 6, 7, 8], max_new_tokens=16, max_denoising_steps=6,
                   entropy_bound=2.0, seed=3)
    alone = await collect(engine := Engine(net, tok, net.cfg, EngineConfig()), a)
    await engine.shutdown()
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=4))
    others = [dg_request(f"o{i}", [9 + i] * (2 + 3 * i), max_new_tokens=8 + 4 * i,
                         max_denoising_steps=3 + i, entropy_bound=0.5 + i, seed=i)
              for i in range(3)]
    a2 = dg_request("a2", a.prompt_ids, **{**a.params.__dict__})
    together = await asyncio.gather(*[collect(engine, r) for r in others + [a2]])
    await engine.shutdown()

    def toks(ev):
        return [t for e in ev if isinstance(e, TextDelta) for t in e.token_ids]
    assert toks(alone) == toks(together[-1]) and toks(alone)


async def test_diffusing_streams_each_canvas_with_placeholders(dg):
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig())
    req = dg_request("d", [5, 6, 7], diffusing=True, max_new_tokens=2 * CANVAS,
                     max_denoising_steps=4, entropy_bound=1.0, seed=1, stop_token_ids=[])
    events = await collect(engine, req)
    await engine.shutdown()
    canvases = [e for e in events if isinstance(e, CanvasUpdate)]
    fin = events[-1]
    assert len(canvases) == fin.steps
    assert MASK_GLYPH in canvases[0].text  # mid-canvas: re-drawn positions are placeholders
    assert canvases[-1].text == fin.text  # the last view is the answer
    assert [c.step for c in canvases] == list(range(1, fin.steps + 1))


async def test_fill_in_the_middle_is_refused(dg):
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig())
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        engine.submit(GenerationRequest("f", [5, 6], SamplingParams(max_new_tokens=8),
                                        suffix_ids=[7, 8]))
    await engine.shutdown()


async def test_cache_of_finished_canvases_is_exact(dg):
    """A three-canvas answer equals the reference: later canvases attend to the earlier ones
    through the paged pool's causal commit (a wrong K/V would change the draws)."""
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig(page_size=4))
    req = dg_request("c", list(range(20, 31)), max_new_tokens=3 * CANVAS,
                     max_denoising_steps=5, entropy_bound=3.0, seed=9, stop_token_ids=[])
    events = await collect(engine, req)
    await engine.shutdown()
    ref = check(net, tok, req, events)
    assert ref.blocks == 3


# --- the entropy-bound rule on a masked model ------------------------------------------------
@pytest.mark.parametrize("bound", [0.05, 1.5])
async def test_masked_entropy_bound_rule_equals_the_reference(bc_net, tok, bound):
    engine = make_engine(bc_net, tok, max_num_seqs=3)
    reqs = [request(f"e{i}", list(range(10 + i, 20 + 2 * i)), max_new_tokens=[16, 24, 9][i],
                    block_length=8, steps=8, remasking="entropy_bound", entropy_bound=bound,
                    temperature=[0.0, 0.7, 0.0][i], seed=i) for i in range(3)]
    await run_like_reference(engine, bc_net, tok, reqs, 2)


def test_entropy_bound_commits_more_per_step_when_the_bound_is_larger(bc_net):
    from model.sampling import generate

    p = dict(max_new_tokens=16, block_length=16, steps=16, remasking="entropy_bound")
    few = generate(bc_net, [10, 11, 12], SamplingParams(entropy_bound=1e-6, **p))
    many = generate(bc_net, [10, 11, 12], SamplingParams(entropy_bound=50.0, **p))
    assert few.steps == 16 and many.steps < few.steps  # one per step vs several
    assert torch.tensor(few.tokens).numel() == 16


async def test_stop_strings_end_the_answer_like_the_sampler(dg):
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=2))
    reqs = [dg_request(f"s{i}", [30 + i, 31, 32], max_new_tokens=3 * CANVAS,
                       max_denoising_steps=4, entropy_bound=2.0, seed=20 + i, stop=["w14"],
                       stop_token_ids=[]) for i in range(3)]
    results = await collect_staggered(engine, reqs)
    await engine.shutdown()
    refs = [check(net, tok, r, ev) for r, ev in zip(reqs, results, strict=True)]
    assert any(r.finish_reason == "stop" and "w14" not in r.text for r in refs)


async def test_cancel_mid_canvas_frees_its_pages_and_spares_the_others(dg):
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=2))
    long = dg_request("long", list(range(40, 52)), diffusing=True, max_new_tokens=3 * CANVAS,
                      max_denoising_steps=10, entropy_bound=1.0, seed=1, stop_token_ids=[])
    other = dg_request("other", [60, 61, 62], max_new_tokens=2 * CANVAS, max_denoising_steps=5,
                       entropy_bound=2.0, seed=2, stop_token_ids=[])

    async def cancel_after(n: int):
        k = 0
        async for _ in engine.submit(long):  # leaving the loop cancels the request
            k += 1
            if k == n:
                break

    _, events = await asyncio.gather(cancel_after(3), collect(engine, other))
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    stats = engine.stats()
    await engine.shutdown()
    check(net, tok, other, events)
    assert stats.kv_pages_used == 0 and stats.running == 0


async def test_a_failed_batch_is_retried_row_by_row_with_the_same_draws(dg, monkeypatch):
    """A batched step that fails after drawing (here: made to) is retried row by row; each
    row's generator is restored first, so the answers are still each request's own."""
    import engine.uniform_batch as ub

    real = ub.uniform_step

    def flaky(logits, canvas, temp, bound, gens):
        if logits.shape[0] > 1:
            torch.rand(5, generator=gens[0])  # a draw, then the failure
            raise RuntimeError("injected batch failure")
        return real(logits, canvas, temp, bound, gens)

    monkeypatch.setattr(ub, "uniform_step", flaky)
    net, tok = dg
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=3))
    reqs = mixed("f")[:3]
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    await engine.shutdown()
    for r, ev in zip(reqs, results, strict=True):
        check(net, tok, r, ev)
