"""Dream's and LLaDA's family defaults reproduce their authors' samplers, token for token.

Each reference below is re-implemented from the published code (Dream's generation_utils.py
`_sample` / `sample_tokens`, DreamLM/Dream; LLaDA's generate.py `generate`, ML-GSAI/LLaDA) and
shares nothing with model/sampling.py: it runs on the float64 reference forward of
tests/model/test_loaders.py over the same tiny checkpoint, cast to float32 as the authors'
samplers read their model's logits. What is pinned:
- temperature 0: same tokens as the published loops, for Dream's three confidence rules with and
  without top_p, and for LLaDA's confidence_eos_eot_inf;
- temperature > 0: the authors draw with torch's RNG (Categorical / rand), which a server cannot
  share, so the reference draws with the same Gumbel-max noise our sampler uses (kernels/noise.py,
  keyed by seed, position, step); given those draws the scores (Dream: on the tempered,
  top-p-truncated distribution; LLaDA: raw) and therefore the commits are the published ones:
  same tokens (Dream's defaults and LLaDA's default; LLaDA's confidence_eos_eot_inf at T > 0 is
  not pinned: generate.py removes only EoT there, by a chained assignment on a copy).
One deviation is in both references, as a logits hook (Dream's generate has
`generation_logits_hook_func` for this): the [MASK] token is never predicted (our samplers ban
it; Dream and LLaDA would commit a [MASK] prediction, which leaves the position masked).
The engine runs the same defaults in mixed, staggered batches and gives the reference's tokens.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from engine.types import GenerationRequest
from kernels.noise import gumbel, uniform_noise
from model import load_pretrained
from model.cli_generate import add_args, sampling_params
from model.families import family_defaults
from model.sampling import SamplingParams, generate
from model.schedule import BlockSchedule, transfer_schedule
from tests.engine.conftest import make_engine, run_like_reference
from tests.model.test_loaders import make_dream, make_llada, ref_llada, ref_qwen2_llama

DREAM_ALG = {"entropy": "entropy", "maskgit_plus": "low_confidence", "topk_margin": "margin"}


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    d = tmp_path_factory.mktemp("dream")
    W, c, ids = make_dream(d)
    net, tok, cfg = load_pretrained(d, progress=False)
    return d, W, c, net, tok, cfg


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada")
    W, c, ids = make_llada(d)
    net, tok, cfg = load_pretrained(d, progress=False)
    return d, W, c, ids, net, tok, cfg


# --------------------------------------------------------------------------------------------
# Dream's diffusion_generate, written from generation_utils.py
# --------------------------------------------------------------------------------------------
def dream_top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative_probs > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def dream_sample_tokens(logits, temperature, top_p, margin_confidence, neg_entropy, draw):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = dream_top_p_logits(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = draw(logits)  # Dream: dists.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_diffusion_generate(forward, prompt, max_new_tokens, steps, mask_id, alg,
                             temperature=0.0, top_p=None, eps=1e-3, seed=0):
    """Dream's `_sample` for one unpadded prompt (attention_mask "full"), alg_temp 0."""
    x = F.pad(torch.tensor([prompt]), (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = forward(x)  # shifted: logits[:, i] predicts token i
        logits[..., mask_id] = float("-inf")  # the logits hook: [MASK] is never predicted
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        pos = mask_index[0].nonzero()[:, 0]

        def draw(z, pos=pos, i=i):  # Gumbel-max with the server's noise in place of torch's RNG
            n = z.shape[0]
            g = gumbel(uniform_noise(torch.full((n,), seed), pos, torch.full((n,), i), z.shape[1]))
            return (z + g).argmax(-1)

        confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p,
                                             alg == "topk_margin", alg == "entropy", draw)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 \
            else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            row = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
            x[row, transfer_index] = x_[row, transfer_index]
    return x[0, len(prompt):].tolist()


def until_stop(tokens, stop_ids):
    """The answer as our sampler returns it: up to and including the first stop token."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    return tokens if cut is None else tokens[:cut + 1]


def dream_params(cfg, max_new, **kw):
    return SamplingParams(**(family_defaults(cfg).sampling_kwargs(max_new) | kw))


@pytest.mark.parametrize("alg,top_p,steps", [("entropy", 0.95, None), ("entropy", None, 5),
                                             ("maskgit_plus", 0.9, None),
                                             ("topk_margin", None, 7)])
def test_dream_default_equals_diffusion_generate_at_temperature_0(dream, alg, top_p, steps):
    _, W, c, net, tok, cfg = dream
    prompt, n = tok.encode("def add(a, b):"), 14
    steps = steps or n
    ref = dream_diffusion_generate(lambda x: ref_qwen2_llama(W, c, x, bias=True).float(),
                                   prompt, n, steps, cfg.mask_id, alg, top_p=top_p)
    params = dream_params(cfg, n, remasking=DREAM_ALG[alg], temperature=0.0,
                          top_p=top_p or 1.0, steps=steps)
    out = generate(net, prompt, params)
    assert out.tokens == until_stop(ref, {cfg.eos_id, cfg.eot_id})


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus"])
def test_dream_default_equals_diffusion_generate_when_sampling(dream, alg):
    _, W, c, net, tok, cfg = dream
    prompt, n = tok.encode("the quick brown"), 12
    for seed in (1, 2):
        ref = dream_diffusion_generate(lambda x: ref_qwen2_llama(W, c, x, bias=True).float(),
                                       prompt, n, n, cfg.mask_id, alg, temperature=0.7,
                                       top_p=0.9, seed=seed)
        params = dream_params(cfg, n, remasking=DREAM_ALG[alg], temperature=0.7, top_p=0.9,
                              seed=seed)
        assert generate(net, prompt, params).tokens == until_stop(ref, {cfg.eos_id, cfg.eot_id})


def test_the_earlier_sampler_stays_available_and_differs(dream):
    """step_schedule "even" + scoring "raw" is the sampler this project ran before; Dream's
    default differs from it (the test above would not notice a default that ignored both)."""
    _, W, c, net, tok, cfg = dream
    prompt, n = tok.encode("def add(a, b):"), 14
    exact = dream_params(cfg, n, temperature=0.0, steps=6)
    old = dream_params(cfg, n, temperature=0.0, steps=6, step_schedule="even", scoring="raw")
    assert exact.schedule.commits(0) != old.schedule.commits(0) == [3, 3, 2, 2, 2, 2]
    assert generate(net, prompt, exact).steps == 6
    outs = {tuple(generate(net, prompt, dream_params(cfg, n, temperature=0.0, steps=6, top_p=0.5,
                                                     stop_token_ids=[], **kw)).tokens)
            for kw in ({}, {"step_schedule": "even", "scoring": "raw"})}
    assert len(outs) == 2


def test_dream_schedule_equals_torch_float32_arithmetic():
    """transfer_schedule("dream") in float64 Python == Dream's float32 torch arithmetic (steps
    are capped at the block's tokens, as every schedule here is)."""
    for n in (1, 2, 7, 16, 31, 64, 100, 256):
        for steps in sorted({min(k, n) for k in (1, 2, 3, n // 3 or 1, n // 2 or 1, n - 1 or 1, n)}):
            ts = torch.linspace(1, 1e-3, steps + 1)
            left, want = n, []
            for i in range(steps):
                m = torch.tensor(left) / 1  # Dream: mask_index.sum() / batch, a float32 tensor
                k = int(m * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(m)
                want.append(k)
                left -= k
            assert transfer_schedule(n, steps, "dream") == want, (n, steps)
    assert BlockSchedule(8, 8, 8, step_schedule="dream").commits(0) == [0, 1, 1, 1, 1, 1, 1, 2]


def test_cli_without_sampler_flags_uses_the_family_defaults(dream):
    d, *_, cfg = dream
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args(["--model", str(d), "--prompt", "x", "--max-tokens", "20"])
    want = SamplingParams(**family_defaults(cfg).sampling_kwargs(20))
    assert sampling_params(args, cfg) == want
    assert (want.block_length, want.steps, want.remasking, want.temperature, want.top_p,
            want.step_schedule, want.scoring) == (20, 20, "entropy", 0.2, 0.95, "dream", "nucleus")
    args = p.parse_args(["--model", str(d), "--prompt", "x", "--max-tokens", "20", "--steps", "4",
                         "--temperature", "0", "--step-schedule", "even", "--scoring", "raw"])
    got = sampling_params(args, cfg)
    assert (got.steps, got.temperature, got.step_schedule, got.scoring, got.top_p) == \
        (4, 0.0, "even", "raw", 0.95)


# --------------------------------------------------------------------------------------------
# LLaDA's generate() with confidence_eos_eot_inf, written from generate.py
# --------------------------------------------------------------------------------------------
def llada_generate(forward, prompt, steps, gen_length, block_length, mask_id, eos, eot,
                   confidence_eos_eot_inf=False, temperature=0.0, seed=0):
    """generate.py with remasking low_confidence, cfg_scale 0 (steps: over the whole answer).
    At temperature > 0 its add_gumbel_noise (float64 exp(logits) / (-log u) ** T) takes u from
    the server's noise (kernels/noise.py keys: seed, position, step in the block) instead of
    torch.rand: the same argmax as Gumbel-max on logits / T."""
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[:, :len(prompt)] = torch.tensor(prompt)
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    P = len(prompt)
    for num_block in range(num_blocks):
        block_mask_index = x[:, P + num_block * block_length:P + (num_block + 1) * block_length] \
            == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        num_transfer_tokens = torch.zeros(1, steps, dtype=torch.int64) + base
        num_transfer_tokens[0, :remainder[0]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = forward(x)
            logits[..., mask_id] = float("-inf")  # the logits hook: [MASK] is never predicted
            logits_with_noise = logits  # add_gumbel_noise returns logits itself at T = 0
            if temperature > 0:
                L, V = x.shape[1], logits.shape[-1]
                u = uniform_noise(torch.full((L,), seed), torch.arange(L), torch.full((L,), i), V)
                logits_with_noise = logits.double().exp() / (-torch.log(u.double())) ** temperature
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos] = logits[:, :, eot] = -torch.inf
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, P + (num_block + 1) * block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            # torch.topk leaves the order of equal values open; positions scoring 0 (an EOS/EoT
            # prediction) tie often, so take equal values in position order, as our sampler does
            order = torch.sort(confidence[0], descending=True, stable=True).indices
            transfer_index[0, order[:int(num_transfer_tokens[0, i])]] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, P:].tolist()


class EosHeavy(torch.nn.Module):
    """The loaded net with EOS/EoT logits raised, like an instruct model near an answer's end:
    without it a random tiny net rarely predicts them and the option would have nothing to do."""

    def __init__(self, net, bias: torch.Tensor):
        super().__init__()
        self.net, self.cfg, self.bias = net, net.cfg, bias

    def forward(self, *args, **kw):
        return self.net(*args, **kw) + self.bias.to(self.net.lm_head.weight.dtype)


def _eos_bias(cfg, ids):
    bias = torch.zeros(cfg.vocab_size)
    bias[ids["<|endoftext|>"]], bias[ids["<|eot_id|>"]] = 3.4, 3.1
    return bias


def test_llada_confidence_eos_eot_inf_equals_generate_py(llada):
    _, W, c, ids, net, tok, cfg = llada
    eos, eot = ids["<|endoftext|>"], ids["<|eot_id|>"]
    bias = _eos_bias(cfg, ids)
    biased = EosHeavy(net, bias)
    fam = family_defaults(cfg)
    on = fam.with_options(confidence_eos_eot_inf=True)
    assert set(on.confidence_inf_token_ids) == {eos, eot} and not on.defer_token_ids
    prompt, gen, block = tok.encode("def add(a, b):"), 32, 16
    for steps in (32, 8):  # LLaDA's steps are over the whole answer; ours per block
        ref = llada_generate(lambda x: ref_llada(W, c, x).float() + bias, prompt, steps, gen,
                             block, cfg.mask_id, eos, eot, confidence_eos_eot_inf=True)
        kw = on.sampling_kwargs(gen) | dict(block_length=block, steps=steps // (gen // block),
                                            stop_token_ids=[])
        out = generate(biased, prompt, SamplingParams(**kw)).tokens
        assert out == ref
        assert sum(t in (eos, eot) for t in ref) >= 2  # the option had EOS/EoT to handle
        plain = llada_generate(lambda x: ref_llada(W, c, x).float() + bias, prompt, steps, gen,
                               block, cfg.mask_id, eos, eot)
        assert plain != ref  # ... and it changed the answer
        old = generate(biased, prompt, SamplingParams(**(
            fam.with_options(defer_eos_eot=True).sampling_kwargs(gen) | kw
            | {"confidence_inf_token_ids": []}))).tokens
        assert old != ref or steps == 32  # the earlier approximation is not the published rule


def test_llada_default_equals_generate_py_when_sampling(llada):
    """LLaDA's default (raw scores, even split) at T > 0, given the same draws."""
    _, W, c, ids, net, tok, cfg = llada
    eos, eot = ids["<|endoftext|>"], ids["<|eot_id|>"]
    prompt, gen, block = tok.encode("hello there"), 32, 16
    for seed, T in ((1, 0.7), (2, 1.0)):
        ref = llada_generate(lambda x: ref_llada(W, c, x).float(), prompt, 16, gen, block,
                             cfg.mask_id, eos, eot, temperature=T, seed=seed)
        kw = family_defaults(cfg).sampling_kwargs(gen) | dict(
            block_length=block, steps=8, temperature=T, seed=seed, stop_token_ids=[])
        assert generate(net, prompt, SamplingParams(**kw)).tokens == ref


# --------------------------------------------------------------------------------------------
# the engine: same defaults, mixed and staggered batches
# --------------------------------------------------------------------------------------------
def _req(rid, prompt, params):
    return GenerationRequest(rid, prompt, params)


async def test_engine_runs_dreams_exact_sampler_like_the_reference(dream):
    d, *_ = dream
    net, tok, cfg = load_pretrained(d, progress=False, dtype=torch.float64)
    reqs = []
    for i, (n, kw) in enumerate([(14, dict(temperature=0.0)), (9, dict(seed=3)),
                                 (20, dict(temperature=0.0, top_p=0.8, steps=6)),
                                 (11, dict(step_schedule="even", scoring="raw", seed=4)),
                                 (16, dict(remasking="margin", temperature=0.5, seed=5)),
                                 (7, dict(temperature=0.0, scoring="drawn", top_p=0.5))]):
        prompt = tok.encode(["def add(a, b):", "hello", "for i in range(10):"][i % 3])
        reqs.append(_req(f"d{i}", prompt, dream_params(cfg, n, stop_token_ids=[], **kw)))
    await run_like_reference(make_engine(net, tok, max_num_seqs=3), net, tok, reqs, every=2)


async def test_engine_runs_lladas_exact_eos_option_like_the_reference(llada):
    d, _, _, ids, *_ = llada
    net, tok, cfg = load_pretrained(d, progress=False, dtype=torch.float64)
    biased = EosHeavy(net, _eos_bias(cfg, ids))
    on = family_defaults(cfg).with_options(confidence_eos_eot_inf=True)
    reqs = [_req(f"l{i}", tok.encode(p), SamplingParams(**(on.sampling_kwargs(n) | dict(
        block_length=8, steps=s, stop_token_ids=[], **kw))))
        for i, (p, n, s, kw) in enumerate([("def add(a, b):", 16, 8, {}),
                                           ("hello", 24, 4, {}),
                                           ("x = 1", 8, 8, {"confidence_inf_token_ids": []}),
                                           ("for i in", 16, 3, {"temperature": 0.6, "seed": 2})])]
    await run_like_reference(make_engine(biased, tok, max_num_seqs=2), biased, tok, reqs)


# --------------------------------------------------------------------------------------------
# the server: the family's exact sampler, request fields over it
# --------------------------------------------------------------------------------------------
def test_server_requests_get_the_family_sampler_and_may_override_it(dream, tmp_path):
    from pydantic import ValidationError

    from deployments.protocol import CompletionRequest
    from engine.types import ModelInfo
    from tests.model.test_fast_dllm import make_fast_dllm

    *_, cfg = dream
    info = ModelInfo.from_config(cfg)
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    p = req.to_sampling_params(info, max_new_tokens=16, steps=16, seed=0)
    assert (p.step_schedule, p.scoring, p.temperature, p.top_p) == ("dream", "nucleus", 0.2, 0.95)
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "step_schedule": "even",
                                            "scoring": "raw"})
    p = req.to_sampling_params(info, max_new_tokens=16, steps=16, seed=0)
    assert (p.step_schedule, p.scoring) == ("even", "raw")
    with pytest.raises(ValidationError):  # a 400 at the ingress
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "step_schedule": "cosine"})
    make_fast_dllm(tmp_path / "f")
    _, _, fcfg = load_pretrained(tmp_path / "f", progress=False)
    finfo = ModelInfo.from_config(fcfg)
    p = CompletionRequest.model_validate({"model": "m", "prompt": "x"}).to_sampling_params(
        finfo, max_new_tokens=32, steps=32, seed=0)
    assert (p.sub_block_length, p.confidence_threshold, p.ar_block_start, p.scoring) == \
        (8, 0.9, True, "drawn")
    p = CompletionRequest.model_validate({"model": "m", "prompt": "x",
                                          "confidence_threshold": 0.5}).to_sampling_params(
        finfo, max_new_tokens=32, steps=32, seed=0)
    assert p.confidence_threshold == 0.5
