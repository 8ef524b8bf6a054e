"""The engine on models whose blocks are aligned to position 0 (LLaDA2.x, SDAR; ModelConfig
.block_align "zero"), loaded from their published formats with MoE layers: mixed, staggered
batches give the reference sampler's tokens (which tests/model/test_loaders_moe.py pins to the
authors' generate), through the eager and the static-shape (CUDA-graph) paths, and the cost the
router charges is what the forwards process.

What is exercised: prompts shorter than a block, ending on a block boundary and mid-block (the
prompt's tail runs with block 0), the block-causal prefill of the prompt's whole blocks in one
masked write, a canvas padded past max_new_tokens, the threshold rule that commits at least the
scheduled count, and per-request block lengths.
"""

from __future__ import annotations

import pytest
import torch

from engine.sequence import Sequence
from engine.types import Finished, GenerationRequest
from model import load_pretrained
from model.sampling import SamplingParams
from model.schedule import request_token_steps
from tests.model.moe_checkpoints import make_llada2, make_sdar

from .conftest import assert_like_reference, make_engine, request, run_like_reference


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    make_llada2(root / "llada2")
    make_sdar(root / "sdar_moe", moe=True)
    return {name: load_pretrained(root / name, dtype=torch.float64, progress=False)[:2]
            for name in ("llada2", "sdar_moe")}


def prompts(vocab: int) -> list[list[int]]:
    # lengths 3 (inside block 0), 8 (a block boundary), 13 and 22 (mid-block, whole blocks first)
    return [[(7 * i + j) % (vocab - 20) + 10 for j in range(n)]
            for i, n in enumerate((3, 8, 13, 22))]


def mixed_requests(vocab: int):
    out = []
    for i in range(7):
        kw = dict(max_new_tokens=[10, 7, 16, 5, 12, 9, 20][i],
                  block_length=[4, 4, 8, 4, 16, 4, 8][i], steps=[4, 2, 3, 1, 5, 4, 8][i],
                  temperature=[0.0, 0.0, 0.8, 0.0, 0.0, 1.0, 0.0][i], seed=11 + i,
                  remasking=["low_confidence", "low_confidence", "margin", "low_confidence",
                             "entropy", "low_confidence", "low_confidence"][i])
        if i in (0, 2, 5, 6):  # the authors' rule: max(above the threshold, the schedule)
            kw.update(confidence_threshold=[0.3, None, 0.5, None, None, 0.4, 0.2][i],
                      threshold_floor="schedule", scoring="drawn")
        if i == 4:
            kw.update(confidence_threshold=0.3)  # Fast-dLLM's at-least-one rule, aligned too
        out.append(request(f"r{i}", prompts(vocab)[i % 4], **kw))
    return out


@pytest.mark.parametrize("which", ["llada2", "sdar_moe"])
async def test_mixed_staggered_batch_equals_reference(models, which):
    net, tok = models[which]
    engine = make_engine(net, tok)
    await run_like_reference(engine, net, tok, mixed_requests(net.cfg.vocab_size))


async def test_static_shape_path_equals_reference(models):
    """EngineConfig.cuda_graphs: rows and lengths padded to buckets (uncaptured on the CPU),
    block 0's prompt head included in the padded rows."""
    net, tok = models["llada2"]
    engine = make_engine(net, tok, cuda_graphs=True)
    await run_like_reference(engine, net, tok, mixed_requests(net.cfg.vocab_size)[:4], every=2)


async def test_stop_token_inside_the_padding_is_not_an_answer(models):
    """The aligned canvas runs past max_new_tokens to a block boundary; what the padding holds
    never reaches the answer, which has exactly max_new_tokens tokens."""
    net, tok = models["sdar_moe"]
    engine = make_engine(net, tok)
    req = request("pad", prompts(net.cfg.vocab_size)[2], max_new_tokens=5, block_length=8,
                  steps=8)
    events = [e async for e in engine.submit(req)]
    await engine.shutdown()
    assert_like_reference(net, tok, req, events)
    assert events[-1].completion_tokens == 5 and events[-1].finish_reason == "length"


@pytest.mark.parametrize("prompt_len", [3, 8, 13, 22])
async def test_the_forwards_process_what_the_request_costs(models, prompt_len):
    """Cache writes (the block-causal prefill, every finished block with block 0's prompt
    head) and denoising forwards add up to the router's charge for the request."""
    net, tok = models["llada2"]
    engine = make_engine(net, tok)
    processed = []
    for name in ("cache_write", "denoise"):
        forward = getattr(engine.runner, name)

        def counting(seqs, forward=forward):
            out = forward(seqs)
            processed.append(out[0])
            return out

        setattr(engine.runner, name, counting)
    prompt = [10 + j for j in range(prompt_len)]
    req = request("c", prompt, max_new_tokens=13, block_length=4, steps=2)
    cost = request_token_steps(prompt_len, 13, 2, 4, True, block_align="zero")
    seq = Sequence.create(GenerationRequest("x", prompt, SamplingParams(
        max_new_tokens=13, block_length=4, steps=2)), net.cfg, tok, "cpu")
    assert seq.backlog() == cost
    stream = engine.submit(req)
    events = [e async for e in stream]
    await engine.shutdown()
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    assert sum(processed) == cost


def test_tp2_engine_gives_the_tokens_of_the_whole_model(models):
    """Rank 0 runs the engine over a TPLeader, rank 1 follows every forward (two gloo
    processes): experts split whole across the ranks, heads and the shared expert split, the
    paged KV pool (with the block-causal prefill mask) on both; the tokens are the one-process
    engine's. ~20 s on an idle machine."""
    import asyncio

    from engine import Engine, EngineConfig
    from model.parallel import run_tp

    from .conftest import streamed_tokens
    from .test_tensor_parallel import _tp_engine_worker, run_requests

    net, tok = models["llada2"]
    reqs = [(2 * i, r) for i, r in enumerate(mixed_requests(net.cfg.vocab_size)[:3])]
    econf = EngineConfig(max_num_seqs=3, kv_pages=64)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ((tp_events, forwards, kv_heads),) = run_tp(_tp_engine_worker, 2, [(net.cfg, state, reqs)],
                                                tok, econf, threads_per_rank=1)
    assert kv_heads == net.cfg.n_kv_heads // 2 and forwards > 0
    ref = asyncio.run(run_requests(Engine(net, tok, net.cfg, econf), reqs))
    for _, r in reqs:
        got, want = tp_events[r.request_id], ref[r.request_id]
        assert isinstance(got[-1], Finished) and got[-1].error is None, got[-1]
        assert streamed_tokens(got) == streamed_tokens(want), r.request_id
        assert (got[-1].finish_reason, got[-1].steps) == (want[-1].finish_reason, want[-1].steps)
