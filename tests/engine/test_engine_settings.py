"""Every setting the step controller moves between (deployments/slo.py: steps per block of the
default ladder, and a confidence-threshold rung) gives the engine exactly the tokens of
model.sampling.generate for a lone request, block-causal and full-attention alike, now that
eager forwards run unpadded (engine/batch.py StepRunner._lengths); the static-shape path that
graph mode pads is pinned by test_cuda_graphs.py."""

from __future__ import annotations

import pytest

from .conftest import assert_like_reference, collect, make_engine, request

PROMPT = list(range(30, 51))  # 21 tokens: a row length no bucket matches
RUNGS = [dict(steps=s) for s in (16, 8, 4, 2)] + [dict(steps=16, confidence_threshold=0.05)]


@pytest.mark.parametrize("net", ["bc_net", "full_net"])
@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()))
async def test_every_rung_equals_reference_alone(request, net, tok, rung):
    model = request.getfixturevalue(net)
    engine = make_engine(model, tok)
    req = request_like(rung)
    events = await collect(engine, req)
    await engine.shutdown()
    assert_like_reference(model, tok, req, events)


def request_like(rung: dict):
    return request("r", PROMPT, **{"max_new_tokens": 40, "block_length": 32, **rung})


async def test_eager_forwards_are_not_padded(bc_net, full_net, tok):
    """The tokens each denoising forward runs are the rows' own: no length bucket (a 21 + 40
    token full-attention row used to run as 64 columns, a 8-token last block as 8)."""
    for model, want in ((full_net, 21 + 40), (bc_net, 32)):
        engine = make_engine(model, tok)
        widths = []
        forward = model.forward

        def spy(ids, *a, widths=widths, forward=forward, **kw):
            widths.append(ids.shape[1])
            return forward(ids, *a, **kw)

        model.forward = spy
        try:
            await collect(engine, request_like(dict(steps=4)))
        finally:
            model.forward = forward
            await engine.shutdown()
        assert want in widths and not [w for w in widths if w > want]
