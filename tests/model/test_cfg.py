"""Classifier-free guidance (SamplingParams.cfg_scale) equals LLaDA's generate(cfg_scale=...).

A tiny LLaDA-format checkpoint (tests/model/test_loaders.make_llada, whose logits are pinned to
LLaDA's architecture there) is loaded with load_pretrained; `llada_generate` below re-implements
ML-GSAI/LLaDA's generate.py loop (block by block, get_num_transfer_tokens' even split, low-
confidence remasking with top-k, the unconditional row with x[prompt_index] = mask_id and
logits = un + (cfg + 1) * (cond - un)) at temperature 0, sharing no code with model/sampling.py.
Both our reference sampler and the engine (the unconditional row in the same step batch as other
requests) must give its tokens exactly. The net runs in float64 so batching differences
(~1e-16) cannot flip an argmax.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import Engine, EngineConfig
from engine.types import Finished, GenerationRequest, TextDelta
from model import load_pretrained
from model.sampling import SamplingParams, generate
from tests.model.test_loaders import make_llada

GEN, BLOCK, STEPS = 16, 8, 8  # LLaDA's arguments: steps over the whole answer (4 per block)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada_cfg") / "llada"
    make_llada(d, seed=5)
    net, tok, cfg = load_pretrained(d, progress=False)
    return net.double().eval(), tok, cfg


def _num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, :remainder[i]] += 1
    return out


@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int,
                   cfg_scale: float, mask_id: int, banned: list[int]) -> torch.Tensor:
    """LLaDA's generate() at temperature 0, remasking="low_confidence". `banned`: the ids our
    server never predicts (the mask token itself; LLaDA's trained model never predicts it,
    random weights might), set to -inf before the argmax as our sampler does."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    P = prompt.shape[1]
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        block_mask_index = x[:, P + nb * block_length: P + (nb + 1) * block_length] == mask_id
        num_transfer_tokens = _num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits[..., banned] = float("-inf")
            x0 = torch.argmax(logits, dim=-1)  # add_gumbel_noise(T=0) is the identity
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            x0_p[:, P + (nb + 1) * block_length:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, P:]


def _params(cfg_scale: float, **kw) -> SamplingParams:
    # stop_token_ids=[]: LLaDA's generate runs every block (no early stop on EOS)
    return SamplingParams(max_new_tokens=GEN, block_length=BLOCK, steps=STEPS * BLOCK // GEN,
                          cfg_scale=cfg_scale, stop_token_ids=[], **kw)


PROMPTS = [[5, 17, 23, 9, 31, 2, 44], [12, 8, 19, 3]]


def _reference(net, cfg, prompt, scale):
    return llada_generate(net, torch.tensor([prompt]), STEPS, GEN, BLOCK, scale, cfg.mask_id,
                          [cfg.mask_id]).tolist()


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_sampler_equals_llada_generate_with_cfg(llada, scale):
    net, tok, cfg = llada
    for prompt in PROMPTS:
        want = _reference(net, cfg, prompt, scale)
        got = generate(net, prompt, _params(scale)).tokens
        assert got == want, (prompt, scale)


def test_guidance_changes_the_answer(llada):
    """The pin above could pass with cfg ignored if guidance never changed a token here."""
    net, tok, cfg = llada
    changed = [_reference(net, cfg, p, 3.0) != _reference(net, cfg, p, 0.0) for p in PROMPTS]
    assert any(changed)


async def _run(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    async def one(r):
        events = [e async for e in engine.submit(r)]
        assert isinstance(events[-1], Finished) and events[-1].error is None, events[-1]
        return [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]

    try:
        return list(await asyncio.gather(*[one(r) for r in reqs]))
    finally:
        await engine.shutdown()


def test_engine_runs_the_unconditional_row_in_the_step_batch(llada):
    """Guided and unguided requests in one step batch: each equals LLaDA's generate."""
    net, tok, cfg = llada
    cases = [(PROMPTS[0], 1.0), (PROMPTS[1], 0.0), (PROMPTS[1], 3.0), (PROMPTS[0], 0.0)]
    reqs = [GenerationRequest(f"r{i}", p, _params(s)) for i, (p, s) in enumerate(cases)]
    engine = Engine(net, tok, cfg, EngineConfig(max_num_seqs=4))
    forwards = []
    hook = net.register_forward_hook(lambda m, a, kw_out=None: forwards.append(a[0].shape[0]))
    try:
        got = asyncio.run(_run(engine, reqs))
    finally:
        hook.remove()
    for (prompt, scale), tokens in zip(cases, got, strict=True):
        assert tokens == _reference(net, cfg, prompt, scale), (prompt, scale)
    # 4 rows + 2 unconditional rows in one forward, not separate passes
    assert max(forwards) == 6


def test_cfg_is_refused_where_it_does_not_apply(llada):
    net, tok, cfg = llada
    with pytest.raises(ValueError, match="full_cache"):
        _params(1.0, full_cache="prefix").validate()
    with pytest.raises(ValueError, match="cfg_scale"):
        _params(-1.0).validate()
    bc = type(cfg).from_dict({**cfg.to_dict(), "attention": "block_causal"})
    from model.transformer import DiffusionTransformer

    with pytest.raises(ValueError, match="full-attention"):
        generate(DiffusionTransformer(bc).eval(), [1, 2], _params(1.0))
