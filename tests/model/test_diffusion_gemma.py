"""Our DiffusionGemma network equals transformers' DiffusionGemmaForBlockDiffusion on the same
weights: the causal encoder's hidden states, the decoder's soft-capped logits with and without a
self-conditioning signal, over a cache that holds a prompt longer than the sliding window and
then a finished canvas too. Float32 on both sides; tolerance 2e-4 on logits in [-30, 30]
(measured max difference ~1e-5: float32 rounding of different summation orders).

Also: the published directory loads sharded, its vision tower is never read, TP slices hold the
right parts, and the engine's pool context and the reference cache agree.
"""

from __future__ import annotations

import json

import pytest
import torch

from model import load_pretrained
from model.diffusion_gemma import DiffusionGemma, GemmaCache, GemmaDense
from model.loaders.common import FormatError

from .diffusion_gemma_ref import CANVAS, VOCAB, hf_model, save_checkpoint

pytest.importorskip("transformers.models.diffusion_gemma")
ATOL = 2e-4


@pytest.fixture(scope="module")
def hf():
    return hf_model(seed=0)


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    return save_checkpoint(hf, tmp_path_factory.mktemp("dg"))


@pytest.fixture(scope="module")
def ours(ckpt):
    net, tok, cfg = load_pretrained(ckpt, progress=False)
    return net


def _hf_cache(hf):
    from transformers import DynamicCache

    return DynamicCache(config=hf.config.get_text_config(decoder=True))


def _positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n)[None]


def test_encoder_hidden_states_equal_transformers(hf, ours):
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.model.encoder(input_ids=ids, cache=_hf_cache(hf)).last_hidden_state
        cache = GemmaCache(ours, batch=1, max_len=64)
        got = ours.encode(ids, _positions(0, 11), cache.context(causal=True), return_hidden=True)
        dense = ours.encode(ids, _positions(0, 11), GemmaDense(ours.shape, causal=True),
                            return_hidden=True)
    assert (got - ref).abs().max() < ATOL
    # the cache's prefill (unmasked causal SDPA where the window does not cut) and the masked
    # dense context agree to float32 rounding
    assert (got - dense).abs().max() < 1e-5
    assert int(cache.lengths[0]) == 11


def test_decoder_logits_equal_transformers_with_and_without_self_conditioning(hf, ours):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 11), generator=g)  # longer than the window (6)
    canvas = torch.randint(0, VOCAB, (1, CANVAS), generator=g)
    sc_logits = 3 * torch.randn(1, CANVAS, VOCAB, generator=g)
    with torch.no_grad():
        hc = _hf_cache(hf)
        hf.model.encoder(input_ids=prompt, cache=hc)
        ref0 = hf(decoder_input_ids=canvas, cache=hc).logits
        ref1 = hf(decoder_input_ids=canvas, cache=hc, self_conditioning_logits=sc_logits).logits
        cache = GemmaCache(ours, batch=1, max_len=64)
        ours.encode(prompt, _positions(0, 11), cache.context(causal=True))
        pos = _positions(11, CANVAS)
        got0 = ours.denoise(canvas, pos, cache.context())
        got1 = ours.denoise(canvas, pos, cache.context(), ours.soft_embedding(sc_logits))
        zeros = ours.denoise(canvas, pos, cache.context(), torch.zeros(1, CANVAS, 32))
        # a finished canvas encoded causally after the prompt, then the next canvas over both
        hf.model.encoder(input_ids=canvas, cache=hc)
        nxt = torch.randint(0, VOCAB, (1, CANVAS), generator=g)
        ref2 = hf(decoder_input_ids=nxt, cache=hc, self_conditioning_logits=sc_logits).logits
        ours.encode(canvas, pos, cache.context(causal=True))
        got2 = ours.denoise(nxt, _positions(11 + CANVAS, CANVAS), cache.context(),
                            ours.soft_embedding(sc_logits))
    assert ref0.abs().max() > 1.0 and (ref0 - ref1).abs().max() > 0.1  # the signal matters
    for got, ref in ((got0, ref0), (got1, ref1), (got2, ref2)):
        assert got.dtype == torch.float32 and got.shape == (1, CANVAS, VOCAB)
        assert (got - ref).abs().max() < ATOL
    assert got0.abs().max() <= 30.0  # soft-capped
    assert torch.equal(zeros, got0)  # a zero signal is exactly "no signal": rows batch together
    assert int(cache.lengths[0]) == 11 + CANVAS  # the decoder never wrote


def test_batched_rows_of_different_lengths_equal_single_rows(ours):
    """Two prompts of different lengths in one padded batch give each row's own logits."""
    g = torch.Generator().manual_seed(3)
    lens = [9, 4]
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lens]
    canvas = torch.randint(0, VOCAB, (2, CANVAS), generator=g)
    single = []
    with torch.no_grad():
        for b, p in enumerate(prompts):
            c = GemmaCache(ours, batch=1, max_len=32)
            ours.encode(p, _positions(0, p.shape[1]), c.context(causal=True))
            single.append(ours.denoise(canvas[b:b + 1], _positions(p.shape[1], CANVAS),
                                       c.context()))
        c = GemmaCache(ours, batch=2, max_len=32)
        ids = torch.zeros(2, 9, dtype=torch.long)
        valid = torch.zeros(2, 9, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, :p.shape[1]], valid[b, :p.shape[1]] = p[0], True
        ours.encode(ids, torch.arange(9).expand(2, 9), c.context(causal=True, query_valid=valid))
        pos = torch.stack([torch.arange(n, n + CANVAS) for n in lens])
        batched = ours.denoise(canvas, pos, c.context())
    for b in range(2):
        assert (batched[b] - single[b][0]).abs().max() < 1e-5


def test_loads_sharded_and_never_reads_the_vision_tower(hf, ckpt, tmp_path):
    sharded = save_checkpoint(hf, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any("vision_tower" in k for k in index["weight_map"])
    a, _, cfg_a = load_pretrained(ckpt, progress=False)
    b, tok, cfg_b = load_pretrained(sharded, progress=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert not any("vision" in n for n, _ in b.named_parameters())
    assert cfg_b.extra["family"] == "diffusion_gemma" and cfg_b.block_length == CANVAS
    assert cfg_b.extra["uniform_defaults"]["max_denoising_steps"] == 6
    assert tok.encode("w10 w11") == [10, 11]


def test_unknown_tensor_is_refused(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_checkpoint(hf, tmp_path / "bad")
    state = load_file(d / "model.safetensors")
    state["model.decoder.layers.0.surprise.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="no place"):
        load_pretrained(d, progress=False)


def test_tp_slices_hold_whole_heads_and_whole_experts(ckpt, ours):
    full = dict(ours.named_parameters())
    for rank in range(2):
        net, _, _ = load_pretrained(ckpt, tp_rank=rank, tp_size=2, progress=False)
        p = dict(net.named_parameters())
        wq = full["layers.1.attn.wq.weight"]  # global layer: 4 heads of 16
        assert torch.equal(p["layers.1.attn.wq.weight"], wq.chunk(2, 0)[rank])
        assert torch.equal(p["layers.0.attn.wo.weight"], full["layers.0.attn.wo.weight"].chunk(2, 1)[rank])
        assert torch.equal(p["layers.2.mlp.w_gate_up"], full["layers.2.mlp.w_gate_up"].chunk(2, 0)[rank])
        assert torch.equal(p["layers.2.mlp.shared.w2.weight"],
                           full["layers.2.mlp.shared.w2.weight"].chunk(2, 1)[rank])
        assert torch.equal(p["tok_embeddings.weight"], full["tok_embeddings.weight"])
        layer = net.layers[1]
        assert layer.attn.n_heads == 2 and layer.attn.n_kv_heads == 1
        assert layer.mlp.n_local == 3 and layer.mlp.expert_offset == 3 * rank


def test_tp_forward_through_an_all_reduce_equals_one_device(ckpt, ours):
    """Two ranks (gloo, two processes) give the single-device logits."""
    from model.parallel import run_tp

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=g)
    canvas = torch.randint(0, VOCAB, (1, CANVAS), generator=g)
    with torch.no_grad():
        c = GemmaCache(ours, batch=1, max_len=32)
        ours.encode(prompt, _positions(0, 9), c.context(causal=True))
        want = ours.denoise(canvas, _positions(9, CANVAS), c.context())
    got = run_tp(_tp_worker, 2, str(ckpt), prompt, canvas)
    assert (got - want).abs().max() < 1e-4


def _tp_worker(rank, world_size, device, ckpt, prompt, canvas):
    import torch.distributed as dist

    net, _, _ = load_pretrained(ckpt, tp_rank=rank, tp_size=world_size, progress=False)
    net.tp_group = dist.group.WORLD
    with torch.no_grad():
        c = GemmaCache(net, batch=1, max_len=32)
        net.encode(prompt, _positions(0, prompt.shape[1]), c.context(causal=True))
        return net.denoise(canvas, _positions(prompt.shape[1], CANVAS), c.context())


def test_random_net_has_the_published_parameter_layout():
    """Built from a config alone (benchmarks), the net names its tensors as the loader fills them."""
    from model.loaders.diffusion_gemma import build_config

    from .diffusion_gemma_ref import hf_config

    cfg = build_config(hf_config().to_dict(), {}, None)
    net = DiffusionGemma(cfg)
    net.init_weights(generator=torch.Generator().manual_seed(0))
    assert net.layers[1].attn.wv is None and net.layers[0].attn.wv is not None
    assert net.kv_shapes == [(2, 8), (2, 16), (2, 8), (2, 8), (2, 16)]


@pytest.mark.parametrize("L,W", [(23, 5), (10, 10), (11, 4), (4, 9)])
def test_prefill_without_a_full_mask_equals_the_masked_attention(L, W):
    """The prefill paths that build no [L, L] mask (unmasked causal; sliding chunks of W
    queries) attend exactly as gemma_mask says (float64)."""
    from model.diffusion_gemma import causal_prefill, gemma_attention, gemma_mask, sliding_prefill

    g = torch.Generator().manual_seed(L * W)
    q = torch.randn(2, 4, L, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    empty, zeros = torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
    valid = torch.ones(2, L, dtype=torch.bool)
    for window, fast in ((W, sliding_prefill(q, k, v, W)), (None, causal_prefill(q, k, v))):
        want = gemma_attention(q, k, v, gemma_mask(window, True, empty, zeros, valid))
        assert (fast - want).abs().max() < 1e-12
