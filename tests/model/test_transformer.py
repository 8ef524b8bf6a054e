import pytest
import torch

from model.cache import KVCache
from model.diffusion import block_causal_mask, segment_ids
from model.transformer import DenseAttention

from .conftest import tiny_config, tiny_net


def test_logits_shape_and_dtype():
    net = tiny_net(tiny_config())
    ids = torch.randint(10, 300, (3, 17))
    logits = net(ids, t=torch.rand(3))
    assert logits.shape == (3, 17, 300)
    assert torch.isfinite(logits).all()


def test_time_conditioning_changes_predictions():
    net = tiny_net(tiny_config())
    ids = torch.randint(10, 300, (1, 8))
    a = net(ids, t=torch.zeros(1))
    b = net(ids, t=torch.ones(1))
    assert (a - b).abs().max() > 1e-3


def test_block_causal_isolation():
    """Changing a later block leaves every earlier block's logits unchanged."""
    net = tiny_net(tiny_config())
    P, bl, L = 5, 4, 17
    ids = torch.randint(10, 300, (1, L))
    seg = segment_ids(L, torch.tensor([P]), bl)
    attn = DenseAttention(block_causal_mask(seg))
    t = torch.rand(1, L)
    a = net(ids, t=t, attn=attn)
    later = P + bl  # first position of the second response block
    ids2 = ids.clone()
    ids2[:, later:] = torch.randint(10, 300, (1, L - later))
    b = net(ids2, t=t, attn=attn)
    torch.testing.assert_close(a[:, :later], b[:, :later], rtol=0, atol=1e-5)
    assert (a[:, later:] - b[:, later:]).abs().max() > 1e-3


def test_full_attention_sees_everything():
    net = tiny_net(tiny_config(attention="full", time_conditioning=False))
    ids = torch.randint(10, 300, (1, 12))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 300
    assert (net(ids)[:, 0] - net(ids2)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_matches_recompute(batch):
    """Prefill + one cached block write + a query block == the same tokens recomputed whole."""
    cfg = tiny_config()
    net = tiny_net(cfg)
    P, bl = 7, 4
    prompt = torch.randint(10, 300, (batch, P))
    blk1 = torch.randint(10, 300, (batch, bl))
    blk2 = torch.full((batch, bl), cfg.mask_id)
    blk2[:, 0] = 42
    frac = torch.full((batch,), 0.75)
    cache = KVCache(cfg, batch, 32)
    pos = torch.arange(P + 2 * bl)[None].expand(batch, -1)
    z = torch.zeros(batch)
    net(prompt, positions=pos[:, :P], t=z, attn=cache.context(append=True))
    net(blk1, positions=pos[:, P:P + bl], t=z, attn=cache.context(append=True))
    cached = net(blk2, positions=pos[:, P + bl:], t=frac, attn=cache.context())
    ids = torch.cat([prompt, blk1, blk2], 1)
    seg = segment_ids(ids.shape[1], torch.full((batch,), P), bl)
    t_tok = torch.zeros(batch, ids.shape[1])
    t_tok[:, P + bl:] = 0.75
    full = net(ids, t=t_tok, attn=DenseAttention(block_causal_mask(seg)))[:, P + bl:]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_kv_cache_ragged_rows():
    """Rows with different cached lengths each see only their own cache."""
    cfg = tiny_config()
    net = tiny_net(cfg)
    cache = KVCache(cfg, 2, 32)
    long_prompt = torch.randint(10, 300, (1, 9))
    short_prompt = long_prompt[:, :5]
    # row 0 gets 9 tokens, row 1 only 5 (the rest of its call is padding)
    valid = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    both = torch.cat([long_prompt, long_prompt], 0)
    net(both, positions=torch.arange(9)[None].expand(2, -1), t=torch.zeros(2),
        attn=cache.context(append=True, query_valid=valid))
    assert cache.lengths.tolist() == [9, 5]
    q = torch.full((2, 3), cfg.mask_id)
    pos = torch.stack([torch.arange(9, 12), torch.arange(5, 8)])
    out = net(q, positions=pos, t=torch.ones(2), attn=cache.context())
    ref_cache = KVCache(cfg, 1, 32)
    net(short_prompt, t=torch.zeros(1), attn=ref_cache.context(append=True))
    ref = net(q[:1], positions=pos[1:], t=torch.ones(1), attn=ref_cache.context())
    torch.testing.assert_close(out[1:], ref, rtol=1e-4, atol=1e-4)


def test_logit_shift_moves_predictions_one_position():
    cfg = tiny_config(attention="full", time_conditioning=False)
    net = tiny_net(cfg)
    shifted = tiny_net(tiny_config(attention="full", time_conditioning=False, logit_shift=True))
    shifted.load_state_dict(net.state_dict())
    ids = torch.randint(10, 300, (1, 10))
    torch.testing.assert_close(shifted(ids)[:, 1:], net(ids)[:, :-1])


def test_meta_build_skips_init_and_leaves_torch_init_working():
    """Building on meta without initialisers (what every loader does) must not leak: a net
    built afterwards, and one built after an error inside the context, is initialised as
    before (std 0.02 embeddings, zero adaLN), and the meta net has every parameter's shape."""
    from torch import nn

    from model.transformer import DiffusionTransformer, skip_parameter_init

    cfg = tiny_config()
    with torch.device("meta"):
        meta = DiffusionTransformer(cfg, init_weights=False)
    with pytest.raises(RuntimeError), skip_parameter_init():
        raise RuntimeError("a loader failed half-way")
    torch.manual_seed(0)
    real = DiffusionTransformer(cfg)
    assert {n: p.shape for n, p in meta.named_parameters()} == \
        {n: p.shape for n, p in real.named_parameters()}
    assert all(p.is_meta for p in meta.parameters())
    std = real.tok_embeddings.weight.std().item()
    assert 0.015 < std < 0.025
    w = torch.empty(64, 64)
    nn.init.ones_(w)
    assert w.eq(1).all()
