"""Many LoRA adapters in one engine: every row of a mixed step batch gets what it gets alone.

Each request names an adapter (or none); the engine puts adapters in slots (EngineConfig
max_loras), and each row of the batched forwards goes through its own slot. The reference for a
row is model/sampling.generate alone on a copy of the net with that adapter merged into the
weights (model/lora.merge_adapter), and the reference sampler on the hooked net itself
(LoRABank.using) must agree with it. float64 nets, so tokens must be equal exactly
(tests/engine/conftest.py says why). Also: LRU eviction under max_loras keeps answers right,
an unknown adapter is refused, a removed adapter is forgotten; DiffusionGemma (uniform diffusion) rows too.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from engine.engine import UnknownAdapterError
from model.loaders.lora import AdapterWeights, LoRAModule
from model.lora import merge_adapter
from model.sampling import generate
from tests.engine.conftest import (
    collect,
    make_engine,
    request,
    streamed_tokens,
    tiny_config,
    tiny_net,
)

MODULES = ("attn.wq", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2")


def random_adapter(net, name: str, rank: int, seed: int, lm_head: bool = False) -> AdapterWeights:
    """A LoRA on every layer's MODULES (and the LM head) strong enough to change the tokens."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(net.named_modules())
    names = [f"layers.{i}.{m}" for i in range(net.cfg.n_layers) for m in MODULES]
    names += ["lm_head"] if lm_head else []
    lora = {}
    for n in names:
        out_f, in_f = mods[n].weight.shape
        lora[n] = LoRAModule(torch.randn(rank, in_f, generator=g) * 0.4,
                             torch.randn(out_f, rank, generator=g) * 0.4, 1.5 / rank)
    return AdapterWeights(name, None, lora)


def merged(net, adapter: AdapterWeights | None):
    """A plain copy of net (no LoRA hooks) with `adapter` merged into its weights."""
    m = copy.deepcopy(net)
    m.lora_bank = None
    for mod in m.modules():  # the copied hooks would still read the engine's bank
        mod._forward_hooks.clear()
    if adapter is not None:
        merge_adapter(m, adapter)
    return m


PROMPTS = [[5, 9, 14, 3, 22, 7], [11, 4, 30], [8, 8, 2, 40, 17, 6, 12, 9, 3], [21, 13]]


@pytest.mark.parametrize("layout", ["block_causal", "full", "graphs"])
async def test_mixed_batch_rows_each_get_their_own_adapter(tok, layout):
    full = layout == "full"
    cfg = tiny_config(tok, attention="full", time_conditioning=False) if full else tiny_config(tok)
    net = tiny_net(cfg, seed=3)
    engine = make_engine(net, tok, max_num_seqs=4, max_loras=2, max_lora_rank=8,
                         cuda_graphs=layout == "graphs")
    ads = {"a1": random_adapter(net, "a1", 4, 1, lm_head=True), "a2": random_adapter(net, "a2", 8, 2)}
    refs = {None: merged(net, None), **{n: merged(net, a) for n, a in ads.items()}}
    for a in ads.values():
        engine.add_adapter(a)
    names = ["a1", None, "a2", "a1"]
    reqs = []
    for i, (p, n) in enumerate(zip(PROMPTS, names, strict=True)):
        r = request(f"r{i}", p, max_new_tokens=16, block_length=8, steps=4)
        r.adapter = n
        reqs.append(r)
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    stats = engine.stats()
    await engine.shutdown()
    bank = engine.lora
    outs = {}
    for r, events, n in zip(reqs, results, names, strict=True):
        ref = generate(refs[n], r.prompt_ids, r.params, tokenizer=tok)
        assert events[-1].error is None
        assert streamed_tokens(events) == ref.tokens, (r.request_id, n)
        # the reference sampler on the hooked net, every row through the adapter's slot
        with bank.using(bank.slot_of(n) if n else None):
            assert generate(net, r.prompt_ids, r.params, tokenizer=tok).tokens == ref.tokens
        outs[r.request_id] = ref.tokens
    # the adapters matter: the same prompt without them answers differently
    base = generate(refs[None], reqs[0].prompt_ids, reqs[0].params, tokenizer=tok).tokens
    assert base != outs["r0"]
    assert stats.extra["lora"]["loads"] == 2 and stats.extra["lora"]["evictions"] == 0


async def test_eviction_under_max_loras_keeps_answers_right(tok, bc_net):
    net = copy.deepcopy(bc_net)
    engine = make_engine(net, tok, max_num_seqs=4, max_loras=1, max_lora_rank=4)
    ads = [random_adapter(net, f"a{i}", 4, 10 + i) for i in range(3)]
    refs = {a.name: merged(net, a) for a in ads}
    for a in ads:
        engine.add_adapter(a)
    order = ["a0", "a1", "a2", "a0", "a1"]
    reqs = []
    for i, n in enumerate(order):
        r = request(f"e{i}", PROMPTS[i % len(PROMPTS)], max_new_tokens=8, block_length=8,
                    steps=4)
        r.adapter = n
        reqs.append(r)
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    stats = engine.stats()
    await engine.shutdown()
    for r, events, n in zip(reqs, results, order, strict=True):
        assert streamed_tokens(events) == generate(refs[n], r.prompt_ids, r.params,
                                                   tokenizer=tok).tokens, r.request_id
    # one slot for three adapters: each switch is a load, each load after the first an eviction
    assert stats.extra["lora"]["loads"] >= 3
    assert stats.extra["lora"]["evictions"] == stats.extra["lora"]["loads"] - 1


async def test_unknown_and_removed_adapters_are_refused(tok, bc_net):
    net = copy.deepcopy(bc_net)
    engine = make_engine(net, tok, max_loras=1, max_lora_rank=4)
    engine.add_adapter(random_adapter(net, "x", 4, 5))
    r = request("u", PROMPTS[0], max_new_tokens=8)
    r.adapter = "nope"
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.submit(r)
    assert engine.remove_adapter("x") and engine.adapter_names() == []
    r.adapter = "x"
    with pytest.raises(UnknownAdapterError):
        engine.submit(r)
    await engine.shutdown()
    plain = make_engine(copy.deepcopy(bc_net), tok)
    with pytest.raises(ValueError, match="max_loras"):
        plain.add_adapter(random_adapter(net, "x", 4, 5))
    with pytest.raises(ValueError, match="max_lora_rank"):
        make_engine(copy.deepcopy(bc_net), tok, max_loras=1, max_lora_rank=2).add_adapter(
            random_adapter(net, "x", 4, 5))
    await plain.shutdown()


async def test_uniform_diffusion_model_rows_get_their_adapter():
    """DiffusionGemma (uniform diffusion, its own runner engine/uniform_batch.py): a row with
    an adapter equals the reference sampler on the merged weights, a row without the base's."""
    pytest.importorskip("transformers")
    from model.uniform import generate_uniform, uniform_params
    from tests.model.diffusion_gemma_ref import hf_tokenizer, random_net

    net = random_net(seed=0, stability_threshold=0, confidence_threshold=3.5)
    tok = hf_tokenizer()
    g = torch.Generator().manual_seed(3)
    mods = dict(net.named_modules())
    lora = {}
    for n, m in mods.items():
        if n.startswith("layers.") and n.endswith(("attn.wq", "attn.wo", "shared.w1", "shared.w2")):
            o, i = m.weight.shape
            lora[n] = LoRAModule(torch.randn(4, i, generator=g) * 0.3,
                                 torch.randn(o, 4, generator=g) * 0.3, 0.5)
    adapter = AdapterWeights("g", None, lora)
    ref_net = merged(net, adapter)
    engine = make_engine(net, tok, max_num_seqs=2, max_loras=1, max_lora_rank=4)
    engine.add_adapter(adapter)
    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    reqs = [GenerationRequest(f"g{i}", [5, 9, 14, 3], SamplingParams(
        max_new_tokens=12, max_denoising_steps=4, seed=1), adapter=a)
        for i, a in enumerate(["g", None])]
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    await engine.shutdown()
    wants = []
    for r, events, ref in zip(reqs, results, [ref_net, merged(net, None)], strict=True):
        want = generate_uniform(ref, r.prompt_ids, uniform_params(net.cfg, r.params),
                                tokenizer=tok)
        assert events[-1].error is None, events[-1].error
        assert streamed_tokens(events) == want.tokens, r.request_id
        wants.append(want.tokens)
    assert wants[0] != wants[1]  # same prompt: the adapter changed the answer
