"""kernels/attention.py: every path pinned to the masked SDPA the project has always run.

flash-attn is on no machine these tests run on, so its varlen path runs here with
`flash_attn_varlen_reference` (flash_attn_varlen_func's contract, one sequence at a time, in
float32; output rows it does not own are NaN) monkeypatched in: the packing of queries and keys,
cu_seqlens, the host bounds and the unpacking are the code under test. Tolerances: float32
1e-5 (summation order: a per-row softmax over the valid keys vs SDPA over a masked row; seen
4e-7); bfloat16 2 ulp (the reference rounds its float32 result once, SDPA rounds in bf16 on the
CPU; seen 1 ulp).

FlexAttention runs eagerly on the CPU in this torch (unfused: it materialises the scores), forward
only (no backward on the CPU), so the block-diffusion flex path is pinned to the dense mask here
on attention outputs and a tiny model's loss; gradients, and the compiled kernel training uses
on CUDA, are the `cuda`-marked test's (gpu_check runs it).
"""

from __future__ import annotations

import pytest
import torch

import kernels.attention as ka
from kernels.attention import (
    BlockDiffusionAttention,
    Ragged,
    attention,
    attention_reference,
    block_diffusion_dense_mask,
    flash_attn_varlen_reference,
    pack_rows,
    ragged_attention,
)
from model.config import ModelConfig
from model.diffusion import block_diffusion_mask, diffusion_loss, segment_ids
from model.transformer import DiffusionTransformer

TOL = {torch.float32: (0, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}  # (rtol, atol)


@pytest.fixture
def fake_flash(monkeypatch):
    """The varlen path forced on, with the torch reference in flash_attn_varlen_func's place."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[5:7])  # (max_seqlen_q, max_seqlen_k)
        return flash_attn_varlen_reference(*args, **kwargs)

    monkeypatch.setattr(ka, "flash_attn_varlen_func", spy)
    monkeypatch.setattr(ka, "VARLEN_PATH", "flash")
    return calls


def _qkv(B, H, Hkv, Lq, Lk, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, hd, generator=g).to(dtype).transpose(1, 2)  # the model's layout
    k = torch.randn(B, Lk, Hkv, hd, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, hd, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def _close(name, got, want, report, rows=None):
    """got/want: [B, H, Lq, hd]; rows: bool [B, Lq] compared (default all)."""
    if rows is not None:
        got, want = got.transpose(1, 2)[rows], want.transpose(1, 2)[rows]
    report(name, got, want)
    rtol, atol = TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def test_default_paths_without_cuda():
    q = torch.zeros(1, 2, 3, 8)
    assert not ka.use_varlen(q)  # no flash-attn here, no CUDA
    assert ka.use_flex(torch.device("cpu")) is False
    assert BlockDiffusionAttention(torch.zeros(1, 4, dtype=torch.long)).flex is False


def test_varlen_reference_is_attention():
    """The stand-in itself: two packed sequences (GQA) equal attention_reference row by row."""
    q, k, v = _qkv(1, 4, 2, 9, 9, 16, torch.float32)
    qp, kp, vp = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [9, H, hd]
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 9], dtype=torch.int32)
    out = flash_attn_varlen_reference(qp, kp, vp, cu_q, cu_k, 5, 6)
    for (q0, q1), (k0, k1) in [((0, 4), (0, 3)), ((4, 9), (3, 9))]:
        want = attention_reference(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], None)
        torch.testing.assert_close(out[q0:q1], want[0].transpose(0, 1), rtol=0, atol=1e-6)


def test_pack_rows_places_each_rows_valid_entries_back_to_back():
    valid = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    cu, gather, dest = pack_rows(valid, total=7)
    assert cu.tolist() == [0, 3, 3, 5] and cu.dtype == torch.int32
    assert gather[:5].tolist() == [0, 2, 3, 8, 9]
    assert dest[valid].tolist() == [0, 1, 2, 3, 4] and (dest[~valid] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_prefix_rows_varlen_equals_masked_sdpa(fake_flash, dtype, report):
    """The engine's full-attention rows: right-padded prefixes (one of a single token, one of
    the full width), GQA 6/2 heads, odd sizes. Valid query rows equal the masked SDPA; padding
    query rows come back zero."""
    lens, L = [7, 1, 13, 4, 13], 13
    q, k, v = _qkv(len(lens), 6, 2, L, L, 24, dtype)
    rows = Ragged.prefix(lens, L)
    got = ragged_attention(q, k, v, rows)
    assert fake_flash == [(L, max(lens))]
    assert got.shape == q.shape and got.dtype == dtype
    ka.VARLEN_PATH = "sdpa"  # restored by monkeypatch
    want = ragged_attention(q, k, v, rows)
    torch.testing.assert_close(want, attention(q, k, v, rows.mask(L)), rtol=0, atol=0)
    _close(f"ragged prefix {dtype}", got, want, report, rows=rows.query_valid)
    assert (got.transpose(1, 2)[~rows.query_valid] == 0).all()


def test_ragged_any_key_pattern_all_queries(fake_flash, report):
    """Keys valid in any pattern (not a prefix), every query real: each row's packed keys are
    its valid ones in order, bounds looser than needed (as a caller's host bounds are)."""
    B, L = 4, 11
    g = torch.Generator().manual_seed(1)
    key_valid = torch.rand(B, L, generator=g) < 0.5
    key_valid[:, 3] = True  # at least one key per row
    q, k, v = _qkv(B, 4, 4, 5, L, 16, torch.float32, seed=2)
    rows = Ragged(key_valid, max_keys=L, total_keys=B * L)
    got = ragged_attention(q, k, v, rows)
    _close("ragged any pattern", got, attention(q, k, v, rows.mask(5)), report)


def _pool(cfg, dtype, seed=0):
    from engine.kv_pool import PagedKVPool

    pool = PagedKVPool(cfg, num_pages=12, page_size=4, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g).to(dtype))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g).to(dtype))
    return pool


@pytest.mark.parametrize("append", [False, True])
def test_paged_attend_varlen_equals_masked_sdpa(fake_flash, append, report):
    """engine/kv_pool.PagedAttention, both paths on the same pool: rows with 11, 0, 6 and 3
    cached tokens over scattered pages, with 4, 1, 2 and 3 valid new tokens of 4 (GQA 4/2).
    Same outputs on the valid queries, and (append) the same K/V written to the pool."""
    cfg = ModelConfig(name="t", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_hidden=64, max_seq_len=128)
    tables, cached = [[3, 7, 1, 9], [0, 5], [2, 4], [6, 8]], [11, 0, 6, 3]
    n_new = torch.tensor([4, 1, 2, 3])
    valid = torch.arange(4)[None, :] < n_new[:, None]  # [4, 4]
    q, k, v = _qkv(4, cfg.n_heads, cfg.n_kv_heads, 4, 4, cfg.head_dim, torch.float32, seed=3)
    pools, outs = [], []
    for path in ("flash", "sdpa"):
        ka.VARLEN_PATH = path
        pool = _pool(cfg, torch.float32)
        ctx = pool.context(tables, cached, valid, append=append)
        outs.append([ctx.attend(layer, q, k, v) for layer in range(cfg.n_layers)])
        pools.append(pool)
    assert len(fake_flash) == cfg.n_layers and fake_flash[0] == (4, 11 + 4)
    for layer in range(cfg.n_layers):
        _close(f"paged layer {layer}", outs[0][layer], outs[1][layer], report, rows=valid)
        assert (outs[0][layer].transpose(1, 2)[~valid] == 0).all()
    assert torch.equal(pools[0].k, pools[1].k) and torch.equal(pools[0].v, pools[1].v)


def test_paged_window_context_keeps_masked_sdpa(fake_flash):
    """A cache window means static shapes (CUDA graphs): never the varlen path."""
    cfg = ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      mlp_hidden=64, max_seq_len=128)
    pool = _pool(cfg, torch.float32)
    ctx = pool.context([[0, 1]], [5], torch.ones(1, 3, dtype=torch.bool), append=False, window=8)
    q, k, v = _qkv(1, 2, 2, 3, 3, cfg.head_dim, torch.float32)
    ctx.attend(0, q, k, v)
    assert fake_flash == [] and not ctx.varlen


# --- block-diffusion training ------------------------------------------------------------------
def _segments():
    # rows with prompts of 5 and 9 tokens, blocks of 4: partial last blocks, different layouts
    return segment_ids(22, torch.tensor([5, 9]), 4)  # [2, 22]


def test_dense_rule_is_block_diffusion_mask():
    seg = _segments()
    assert torch.equal(block_diffusion_dense_mask(seg), block_diffusion_mask(seg))


def _flex_vs_dense(monkeypatch, device, hkv, grad):
    """(flex results, dense results): out and, with grad, dq, dk, dv of a weighted sum."""
    seg = _segments().to(device)
    L = seg.shape[1]
    q, k, v = (x.detach().to(device).contiguous().requires_grad_(grad) for x in
               _qkv(2, 4, hkv, 2 * L, 2 * L, 16, torch.float32, seed=4))
    w = torch.randn(2, 4, 2 * L, 16, generator=torch.Generator().manual_seed(5)).to(device)
    results = []
    for path in ("flex", "sdpa"):
        monkeypatch.setattr(ka, "TRAINING_PATH", path)
        ctx = BlockDiffusionAttention(seg)
        assert ctx.flex == (path == "flex")
        out = ctx.attend(0, q, k, v)
        got = [out.detach()]
        if grad:
            (out * w).sum().backward()
            got += [x.grad.clone() for x in (q, k, v)]
            for x in (q, k, v):
                x.grad = None
        results.append(got)
    return results


@pytest.mark.parametrize("hkv", [4, 2])
def test_flex_block_diffusion_equals_dense_sdpa(monkeypatch, hkv, report):
    """FlexAttention (eager on the CPU) with the BlockMask vs SDPA with the dense [2L, 2L]
    mask on the BD3-LM [noisy ; clean] layout, float32 within 1e-5. Forward only: this torch's
    FlexAttention has no backward on the CPU (the CUDA test below checks gradients)."""
    flex, dense = _flex_vs_dense(monkeypatch, "cpu", hkv, grad=False)
    report("flex vs dense out", flex[0], dense[0])
    torch.testing.assert_close(flex[0], dense[0], rtol=0, atol=1e-5)


def _tiny_loss(monkeypatch, device, grad):
    cfg = ModelConfig(name="t", vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_hidden=128, max_seq_len=64, mask_id=1)
    torch.manual_seed(0)
    net = DiffusionTransformer(cfg).to(device)
    x0 = torch.randint(2, 96, (2, 30), generator=torch.Generator().manual_seed(6)).to(device)
    prompt_len = torch.tensor([6, 11], device=device)
    results = []
    for path in ("flex", "sdpa"):
        monkeypatch.setattr(ka, "TRAINING_PATH", path)
        net.zero_grad()
        with torch.set_grad_enabled(grad):
            loss, _ = diffusion_loss(net, x0, prompt_len, 8,
                                     generator=torch.Generator(device).manual_seed(7))
        if grad:
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                                         if p.grad is not None}))
    return results


def test_flex_training_loss_equals_dense(monkeypatch, report):
    """A tiny block-causal model's diffusion_loss through FlexAttention equals the dense-mask
    one on the same noise draw, within 1e-5 (forward: see above)."""
    (l_flex, _), (l_dense, _) = _tiny_loss(monkeypatch, "cpu", grad=False)
    report("loss flex vs dense", l_flex, l_dense)
    torch.testing.assert_close(l_flex, l_dense, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("hkv", [4, 2])
def test_flex_gradients_equal_dense_cuda(monkeypatch, hkv, report):
    """The compiled FlexAttention kernel on CUDA: outputs and q/k/v gradients vs the dense
    mask, and a tiny model's loss and parameter gradients (float32; rtol 1e-3, atol 1e-4: a
    different summation order, and room for TF32 if the kernel uses it; a wrong mask moves
    values by O(1e-1))."""
    flex, dense = _flex_vs_dense(monkeypatch, "cuda", hkv, grad=True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), flex, dense, strict=True):
        report(f"flex vs dense {name}", got, want)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    (l_flex, g_flex), (l_dense, g_dense) = _tiny_loss(monkeypatch, "cuda", grad=True)
    torch.testing.assert_close(l_flex, l_dense, rtol=1e-3, atol=1e-4)
    assert g_flex.keys() == g_dense.keys() and g_dense
    for n in g_dense:
        torch.testing.assert_close(g_flex[n], g_dense[n], rtol=1e-3, atol=1e-4, msg=n)
