"""The paged KV pool against the contiguous reference cache (model/cache.py), and the batched
step's logits against each row's lone reference forward, at float32 serving precision.

Both attention paths of kernels/attention.py run here: masked SDPA (what this machine picks) and
the flash-attn varlen path, forced on with `flash_attn_varlen_reference` standing in for
flash_attn_varlen_func (flash-attn is on no machine the tests run on): its packing of the paged
cache and of the full-attention rows is pinned to the reference logits and tokens."""

from __future__ import annotations

import pytest
import torch

import kernels.attention as ka
from engine.batch import StepRunner
from engine.config import EngineConfig
from engine.kv_pool import PagedKVPool
from engine.sequence import Sequence
from model.cache import KVCache

from .conftest import (
    make_engine,
    request,
    run_like_reference,
    tiny_config,
    tiny_net,
)

# float32 logits of a batched forward differ from a lone one by rounding only (max seen ~2e-6 on
# these nets); 1e-4 is far below the gaps that decide commits at these logit scales (~1e-1).
ATOL = 1e-4


class Path(str):
    calls = 0  # flash_attn_varlen_func calls (the stand-in's)


@pytest.fixture(params=["sdpa", "flash"])
def attention_path(request, monkeypatch):
    """The engine's attention path: masked SDPA, or flash-attn varlen with the torch stand-in
    (float32 / float64 inside, as the inputs). The returned name counts the stand-in's calls."""
    path = Path(request.param)

    def stand_in(*args, **kwargs):
        path.calls += 1
        return ka.flash_attn_varlen_reference(*args, **kwargs)

    monkeypatch.setattr(ka, "flash_attn_varlen_func", stand_in)
    monkeypatch.setattr(ka, "VARLEN_PATH", request.param)
    yield path
    assert (path.calls > 0) == (path == "flash"), path.calls


def test_pages_are_allocated_and_freed(tok):
    cfg = tiny_config(tok)
    pool = PagedKVPool(cfg, num_pages=5, page_size=4)
    assert pool.pages_for(9) == 3
    a = pool.allocate(3)
    assert pool.allocate(3) is None and pool.used_pages == 3  # all or nothing
    b = pool.allocate(2)
    assert sorted(a + b) == list(range(5)) and pool.free_pages == 0
    pool.free(a)
    assert pool.used_pages == 2 and pool.free_pages == 3


def reference_logits(net, prompt, blocks, t):
    """Prefill, cache every block but the last (t = 0), then denoise the last: KVCache."""
    cfg = net.cfg
    cache = KVCache(cfg, batch=1, max_len=len(prompt) + sum(map(len, blocks)))
    pos = 0
    for ids in [prompt, *blocks[:-1]]:
        net(torch.tensor([ids]), positions=torch.arange(pos, pos + len(ids))[None],
            t=torch.zeros(1), attn=cache.context(append=True))
        pos += len(ids)
    last = blocks[-1]
    return net(torch.tensor([last]), positions=torch.arange(pos, pos + len(last))[None],
               t=torch.tensor([t]), attn=cache.context())[0]


def test_batched_step_logits_match_reference_float32(tok, attention_path):
    """Rows with different prompts, cache lengths and block lengths, pages interleaved in the
    pool: the step's logits equal each row's lone KVCache forward within ATOL, on either
    attention path (prefill and block cache writes included)."""
    net = tiny_net(tiny_config(tok), seed=3, dtype=torch.float32)
    cfg = net.cfg
    econf = EngineConfig(kv_pages=32, page_size=4)
    pool = PagedKVPool(cfg, econf.kv_pages, econf.page_size)
    runner = StepRunner(net, pool, econf)
    specs = [(list(range(20, 27)), 8, 2), (list(range(30, 53)), 4, 3), (list(range(5, 8)), 16, 1)]
    seqs = []
    for i, (prompt, bl, n_done) in enumerate(specs):
        seq = Sequence.create(request(f"s{i}", prompt, max_new_tokens=bl * (n_done + 1),
                                      block_length=bl), cfg, tok, "cpu")
        seqs.append(seq)
    for seq in seqs:  # one page at a time, round robin: every row's pages are scattered
        seq.pages = []
    for _ in range(max(pool.pages_for(s.cache_tokens_needed()) for s in seqs)):
        for seq in seqs:
            if len(seq.pages) < pool.pages_for(seq.cache_tokens_needed()):
                seq.pages += pool.allocate(1)
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for seq, (prompt, bl, n_done) in zip(seqs, specs, strict=True):
        seq.state = "running"
        seq.canvas[:] = torch.randint(10, cfg.vocab_size, (seq.params.max_new_tokens,), generator=gen)
        seq.canvas[-bl:][::3] = cfg.mask_id  # the active block is partly masked
        blocks.append([seq.canvas[b * bl:(b + 1) * bl].tolist() for b in range(n_done + 1)])
        seq.pending_append = (0, len(prompt))
    with torch.no_grad():
        runner.cache_write(seqs)[1]()  # prefill all rows in one batch
        for b in range(max(s[2] for s in specs)):  # then their finished blocks, batched
            rows = [s for s, (_, _, n_done) in zip(seqs, specs, strict=True) if b < n_done]
            for s in rows:
                lo, hi = s.span(b)
                s.pending_append = (len(s.prompt) + lo, len(s.prompt) + hi)
            runner.cache_write(rows)[1]()
        for s, (_, _, n_done) in zip(seqs, specs, strict=True):
            s.block = n_done
        # logits of each row's masked positions only: [B, M, V], positions in `order`
        logits, order, _, _, counts, _ = runner._block_causal_logits(seqs)
        worst = 0.0
        for i, (prompt, bl, _) in enumerate(specs):
            last = blocks[i][-1]
            t = sum(x == cfg.mask_id for x in last) / bl
            ref = reference_logits(net, prompt, blocks[i], t)
            n = int(counts[i])
            assert order[i, :n].tolist() == [j for j, x in enumerate(last) if x == cfg.mask_id]
            err = (logits[i, :n] - ref[order[i, :n]]).abs().max().item()
            worst = max(worst, err)
            assert err < ATOL, (i, err)
    print(f"max |batched - reference| logit difference ({attention_path}): {worst:.2e}")


def _requests(prefix: str, suffix: bool = False):
    """Prompts of 1 to 40 tokens, blocks of 1 to 16, short last blocks, some FIM suffixes."""
    out = []
    for i, (plen, n, bl, steps) in enumerate([(3, 16, 4, 2), (17, 21, 8, 8), (40, 7, 16, 3),
                                               (1, 9, 1, 1), (25, 12, 4, 4)]):
        sfx = list(range(50, 50 + i)) if suffix and i % 2 else None
        out.append(request(f"{prefix}{i}", list(range(10 + i, 10 + i + plen)), suffix=sfx,
                           max_new_tokens=n, block_length=bl, steps=steps,
                           temperature=[0.0, 0.7][i % 2], seed=7 + i))
    return out


@pytest.mark.parametrize("net_name", ["bc_net", "full_net"])
async def test_engine_tokens_equal_reference_on_both_attention_paths(
        request, tok, attention_path, net_name):
    """A staggered mixed batch through the engine (paged pool for the block-causal net, padded
    rows with lengths for the full-attention one) gives each request's lone reference tokens
    (float64 nets: exact), whichever attention path the engine takes."""
    net = request.getfixturevalue(net_name)
    engine = make_engine(net, tok, max_num_seqs=4)
    reqs = _requests(net_name[:2], suffix=net_name == "full_net")
    await run_like_reference(engine, net, tok, reqs, 2)


async def test_static_shapes_keep_masked_sdpa_with_flash_forced(tok, bc_net, full_net,
                                                                 monkeypatch):
    """With cuda_graphs on, the denoising steps run static shapes, which keep masked SDPA (a
    graph binds only the mask buffers): the full-attention net, all of whose forwards are
    static steps, never reaches flash_attn_varlen_func; the block-causal one does, from its
    eager cache writes (append) only. Tokens equal the reference either way."""
    from engine.kv_pool import PagedAttention

    calls, flash_contexts = [], []

    def stand_in(*args, **kwargs):
        calls.append(args[0].shape[0])
        return ka.flash_attn_varlen_reference(*args, **kwargs)

    attend = PagedAttention.attend

    def spy(self, layer, q, k, v):
        n = len(calls)
        out = attend(self, layer, q, k, v)
        if len(calls) > n:
            flash_contexts.append((self.append, self.args["window"]))
        return out

    monkeypatch.setattr(ka, "flash_attn_varlen_func", stand_in)
    monkeypatch.setattr(ka, "VARLEN_PATH", "flash")
    monkeypatch.setattr(PagedAttention, "attend", spy)
    for net, name in ((full_net, "full"), (bc_net, "bc")):
        calls.clear()
        engine = make_engine(net, tok, max_num_seqs=4, cuda_graphs=True)
        reqs = _requests(f"g{name}", suffix=name == "full")
        await run_like_reference(engine, net, tok, reqs)
        if name == "full":
            assert calls == []
        else:
            assert flash_contexts and set(flash_contexts) == {(True, None)}, set(flash_contexts)
