"""Fast-dLLM's approximate prefix / dual KV cache for full-attention models (SamplingParams.full_cache).

A spy around the net records every forward generate() runs, so the tests check what the cache
is supposed to do: how many forwards and how many tokens each, that a block's first step (the
refresh) gives exactly the uncached logits, and that a later step gives the logits of an
independent computation of the same approximation: one dense-mask forward over
[the refresh-time sequence ; the step's queries], where the first part sees only itself (so its
K/V are the refresh's) and the queries see the visible part of it and themselves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.sampling import SamplingParams, generate
from model.schedule import cached_query_span
from model.transformer import DenseAttention

from .conftest import tiny_config, tiny_net

PROMPT = list(range(20, 31))  # 11 tokens
SUFFIX = list(range(60, 66))  # 6 tokens


class Spy(nn.Module):
    """The net, recording each call's inputs and logits."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.cfg = net, net.cfg
        self.calls: list[dict] = []

    def forward(self, input_ids, **kw):
        out = self.net(input_ids, **kw)
        self.calls.append(dict(ids=input_ids.clone(), positions=kw.get("positions"),
                               t=kw.get("t"), attn=kw.get("attn"),
                               logits_slice=kw.get("logits_slice"), logits=out.clone()))
        return out


def full_net(shift: bool = False, time: bool = False, seed: int = 1) -> nn.Module:
    cfg = tiny_config(attention="full", time_conditioning=time, logit_shift=shift)
    return tiny_net(cfg, seed=seed).double()


def run(net, mode: str, suffix=None, **kw) -> tuple[Spy, object]:
    params = SamplingParams(**{"max_new_tokens": 20, "steps": 4, "block_length": 8,
                               "stop_token_ids": [], "full_cache": mode, **kw})
    spy = Spy(net)
    return spy, generate(spy, PROMPT, params, suffix_ids=suffix)


def expected_calls(mode: str, N: int, bl: int, steps: int, S: int, shift: bool):
    """(tokens, is_refresh) of every forward for a run where each block takes all its steps."""
    P = len(PROMPT)
    L = P + N + S
    out = []
    for lo in range(0, N, bl):
        hi = min(N, lo + bl)
        for s in range(min(steps, hi - lo)):
            if mode == "none" or s == 0:
                out.append((L, True))
            else:
                q0, q1 = cached_query_span(mode, P, lo, hi, L, shift)
                out.append((q1 - q0, False))
    return out


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_forwards_and_tokens_per_forward(mode, shift):
    spy, r = run(full_net(shift), mode, suffix=SUFFIX)  # blocks of 8, 8 and a short 4
    want = expected_calls(mode, 20, 8, 4, len(SUFFIX), shift)
    assert [(c["ids"].shape[1], c["positions"] is None) for c in spy.calls] == want
    assert r.steps == len(want) == 12
    if mode == "prefix":  # block 1 (canvas 8..16), later steps: from the block to the end
        assert want[5][0] == 37 - (11 + 8 - shift)
    if mode == "dual":  # only the block (and, shifted, the token before it)
        assert {n for n, refresh in want if not refresh} == {8 + shift, 4 + shift}


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refresh_logits_equal_uncached_logits_exactly(mode, shift):
    net = full_net(shift)
    spy, _ = run(net, mode, suffix=SUFFIX)
    refreshes = [c for c in spy.calls if c["positions"] is None]
    assert len(refreshes) == 3
    for c in refreshes:
        plain = net(c["ids"], t=c["t"], logits_slice=c["logits_slice"])
        assert torch.equal(c["logits"], plain)


def independent_step_logits(net, refresh: dict, step: dict, q0: int, q1: int) -> torch.Tensor:
    """The cached step's logits from one dense-mask forward over [refresh ids ; step ids]."""
    r_ids, q_ids = refresh["ids"], step["ids"]
    L, Lq = r_ids.shape[1], q_ids.shape[1]
    ids = torch.cat([r_ids, q_ids], 1)
    pos = torch.cat([torch.arange(L), torch.arange(q0, q1)])[None]
    j = torch.arange(L + Lq)
    visible = (j < q0) | ((j >= q1) & (j < L))  # refresh-time positions the queries see
    mask = torch.zeros(L + Lq, L + Lq, dtype=torch.bool)
    mask[:L, :L] = True  # the refresh-time copy sees only itself: its K/V are the refresh's
    mask[L:, :] = visible | (j >= L)
    t = None
    if step["t"] is not None:  # per token: the refresh's t for its part, the step's for the rest
        t = torch.cat([refresh["t"][:, None].expand(1, L), step["t"][:, None].expand(1, Lq)], 1)
    sl = step["logits_slice"]
    return net(ids, positions=pos, t=t, attn=DenseAttention(mask[None, None]),
               logits_slice=slice(L + sl.start, L + sl.stop))


@pytest.mark.parametrize("time", [False, True], ids=["no_t", "time_conditioned"])
@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_step_logits_equal_independent_recomputation(mode, shift, time):
    net = full_net(shift, time)
    spy, _ = run(net, mode, suffix=SUFFIX)
    P, N = len(PROMPT), 20
    L = P + N + len(SUFFIX)
    refresh, checked = None, 0
    for c in spy.calls:
        if c["positions"] is None:
            refresh = c
            continue
        q0 = int(c["positions"][0, 0])
        q1 = q0 + c["ids"].shape[1]
        lo = q0 - P + (1 if shift else 0)
        hi = min(N, lo + 8)
        assert (q0, q1) == cached_query_span(mode, P, lo, hi, L, shift)
        # the queries are the current sequence at [q0, q1): the prompt/suffix are unchanged
        assert torch.equal(c["ids"][0, :max(0, P - q0)], torch.tensor(PROMPT[q0:]))
        want = independent_step_logits(net, refresh, c, q0, q1)
        torch.testing.assert_close(c["logits"], want, atol=1e-10, rtol=1e-10)
        checked += 1
    assert checked == 9


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_approximates_and_block_length_one_is_exact(mode):
    net = full_net()
    none = run(net, "none", suffix=SUFFIX)[1]
    cached = run(net, mode, suffix=SUFFIX)[1]
    assert len(cached.tokens) == 20 and cached.finish_reason == "length"
    assert net.cfg.mask_id not in cached.tokens
    # one step per block: every step is a refresh, so the tokens are the uncached ones
    kw = dict(block_length=1, steps=1, max_new_tokens=9)
    spy, one = run(net, mode, suffix=SUFFIX, **kw)
    assert one.tokens == run(net, "none", suffix=SUFFIX, **kw)[1].tokens
    assert all(c["positions"] is None for c in spy.calls) and len(spy.calls) == 9
    assert none.steps == cached.steps


def test_fim_suffix_stays_in_the_cache():
    """Dual mode never recomputes the suffix, but its refresh-time K/V are attended: a different
    suffix changes the cached steps' logits."""
    net = full_net()
    a, _ = run(net, "dual", suffix=SUFFIX, max_new_tokens=8)
    b, _ = run(net, "dual", suffix=[s + 40 for s in SUFFIX], max_new_tokens=8)
    cached_a = [c for c in a.calls if c["positions"] is not None]
    cached_b = [c for c in b.calls if c["positions"] is not None]
    assert all(c["ids"].shape[1] == 8 for c in cached_a)  # the block only
    assert not torch.allclose(cached_a[0]["logits"], cached_b[0]["logits"])


def test_none_is_the_uncached_sampler_and_block_causal_ignores_the_mode():
    net = full_net()
    spy, r = run(net, "none", suffix=SUFFIX)
    assert all(c["attn"] is None and c["positions"] is None for c in spy.calls)
    assert r.tokens == run(net, "none", suffix=SUFFIX)[1].tokens
    bc = tiny_net(tiny_config(), seed=3).double()
    base = run(bc, "none")[1]
    for mode in ("prefix", "dual"):
        assert run(bc, mode)[1].tokens == base.tokens


def test_full_cache_is_validated():
    with pytest.raises(ValueError, match="full_cache"):
        SamplingParams(full_cache="suffix").validate()
