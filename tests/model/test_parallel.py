"""Tensor parallelism on the CPU: a model sharded over 2 gloo processes computes what the whole
model computes (logits within fp32 rounding, the same tokens at temperature 0).

Each multi-process test spawns 2 ranks (a few seconds of start-up each), so the multi-process
checks are grouped into few spawns.
"""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import save_checkpoint
from model.parallel import (
    ShardConfig,
    apply_tp,
    build_rank_model,
    load_sharded,
    load_sharded_state,
    run_tp,
    tp_forward,
    tp_generate,
    unshard_config,
)
from model.sampling import SamplingParams, generate

from .conftest import tiny_config, tiny_net

PROMPT = list(range(20, 45))
FP32_ATOL = 1e-5  # two all-reduces per block re-associate float32 sums: ~1e-7 relative


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_tokenizer):
    """A block-causal, time-conditioned tiny checkpoint in the project's format."""
    cfg = tiny_config(small_tokenizer)
    net = tiny_net(cfg, seed=3)
    d = tmp_path_factory.mktemp("tp-ckpt")
    save_checkpoint(d, net, small_tokenizer)
    return d, net, small_tokenizer


def test_apply_tp_slices_and_reassembles():
    cfg = tiny_config(qkv_bias=True)
    full = tiny_net(cfg)
    ranks = [apply_tp(copy.deepcopy(full), r, 2) for r in range(2)]
    a0, a1 = ranks[0].layers[0].attn, ranks[1].layers[0].attn
    f = full.layers[0].attn
    assert torch.equal(torch.cat([a0.wq.weight, a1.wq.weight]), f.wq.weight)  # column: rows
    assert torch.equal(torch.cat([a0.wk.bias, a1.wk.bias]), f.wk.bias)
    assert torch.equal(torch.cat([a0.wo.weight, a1.wo.weight], dim=1), f.wo.weight)  # row: cols
    m0, m1 = ranks[0].layers[1].mlp, ranks[1].layers[1].mlp
    assert torch.equal(torch.cat([m0.w2.weight, m1.w2.weight], dim=1), full.layers[1].mlp.w2.weight)
    # head counts per rank, head_dim of the full model, caches sized from the rank's config
    assert (a0.n_heads, a0.n_kv_heads) == (2, 1)
    assert isinstance(ranks[0].cfg, ShardConfig)
    assert (ranks[0].cfg.n_kv_heads, ranks[0].cfg.head_dim) == (1, cfg.head_dim)
    assert unshard_config(ranks[1].cfg) == cfg
    # replicated parts stay whole, the tied head stays tied
    assert torch.equal(ranks[1].tok_embeddings.weight, full.tok_embeddings.weight)
    assert ranks[1].lm_head.weight is ranks[1].tok_embeddings.weight
    with pytest.raises(ValueError, match="divisible"):
        apply_tp(copy.deepcopy(full), 0, 3)


def test_sharded_loading_never_needs_the_full_model(tmp_path, ckpt):
    """Rank slices from a state dict, from lazy safetensors slices, and from the loaders' sliced
    read of a checkpoint all equal slicing the materialised model."""
    d, net, _ = ckpt
    state = {k: v for k, v in net.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for rank in range(2):
        want = dict(apply_tp(copy.deepcopy(net), rank, 2).named_parameters())
        from_state = load_sharded_state(net.cfg, state, rank, 2)
        with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
            lazy = {k: f.get_slice(k) for k in f.keys()}
            from_slices = load_sharded_state(net.cfg, lazy, rank, 2)
        from_disk = load_sharded(d, rank, 2)[0]
        for got in (from_state, from_slices, from_disk):
            params = dict(got.named_parameters())
            assert params.keys() == want.keys()
            for k in want:
                assert torch.equal(params[k], want[k]), k
            assert got.layers[0].attn.n_kv_heads == 1 and isinstance(got.cfg, ShardConfig)


def _variants_worker(rank, world_size, device, ckpt_dir, ids, t, full_cfg, gpt2_cfg, prompt):
    """Several checks in one spawn: returns rank 0's logits/tokens for each."""
    out = {}
    net = build_rank_model(ckpt_dir, rank, world_size, device)
    with torch.no_grad():
        out["vocab_parallel"] = build_rank_model(ckpt_dir, rank, world_size, device,
                                                 vocab_parallel=True)(ids, t=t)
        out["gpt2"] = build_rank_model(gpt2_cfg, rank, world_size, device, seed=1)(ids)
        out["full"] = build_rank_model(full_cfg, rank, world_size, device, seed=2)(ids)
    sampled = SamplingParams(max_new_tokens=24, steps=4, block_length=8, temperature=1.0,
                             top_p=0.9, seed=11)
    out["sampled"] = generate(net, prompt, sampled).tokens
    full_net = build_rank_model(full_cfg, rank, world_size, device, seed=2)
    out["full_generate"] = generate(full_net, prompt, SamplingParams(max_new_tokens=16, steps=4,
                                                                     block_length=8)).tokens
    return out


@pytest.mark.slow
def test_tp2_logits_and_tokens_match_tp1(ckpt, small_tokenizer):
    d, net, _ = ckpt
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    t = torch.tensor([0.0, 0.5])

    # 1. the public one-forward runner, from the checkpoint (sliced from disk on each rank)
    logits = tp_forward(d, ids, tensor_parallel=2, t=t)
    with torch.no_grad():
        want = net(ids, t=t)
    err = (logits - want).abs().max().item()
    print(f"TP=2 vs TP=1 logits: max abs err {err:.3g}")
    assert err <= FP32_ATOL

    # 2. the public generate runner: same tokens at temperature 0 (block-causal + KV cache)
    params = SamplingParams(max_new_tokens=40, steps=4, block_length=8)
    got = tp_generate(d, PROMPT, params, tensor_parallel=2)
    assert got.tokens == generate(net, PROMPT, params).tokens
    assert got.steps == generate(net, PROMPT, params).steps

    # 3. vocab-parallel head, GPT-2 arch (biases: a row-parallel bias added once), full
    #    attention, and a sampled generation, in one more spawn
    full_cfg = tiny_config(small_tokenizer, attention="full", time_conditioning=False)
    gpt2_cfg = tiny_config(arch="gpt2", qkv_bias=True, time_conditioning=False,
                           tie_embeddings=False)
    out = run_tp(_variants_worker, 2, d, ids, t, full_cfg, gpt2_cfg, PROMPT)
    gpt2_full = build_rank_model(gpt2_cfg, 0, 1, "cpu", seed=1)
    attn_full = build_rank_model(full_cfg, 0, 1, "cpu", seed=2)
    with torch.no_grad():
        for name, ref in (("vocab_parallel", net(ids, t=t)), ("gpt2", gpt2_full(ids)),
                          ("full", attn_full(ids))):
            e = (out[name] - ref).abs().max().item()
            print(f"TP=2 {name}: max abs err {e:.3g}")
            assert e <= FP32_ATOL, name
    sampled = SamplingParams(max_new_tokens=24, steps=4, block_length=8, temperature=1.0,
                             top_p=0.9, seed=11)
    assert out["sampled"] == generate(net, PROMPT, sampled).tokens
    assert out["full_generate"] == generate(
        attn_full, PROMPT, SamplingParams(max_new_tokens=16, steps=4, block_length=8)).tokens


@pytest.mark.slow
def test_cli_tensor_parallel_prints_the_same_completion(ckpt, capsys):
    from model.cli_generate import main

    d, _, _ = ckpt
    argv = ["--model", str(d), "--prompt", "def parse(s):", "--max-tokens", "24",
            "--steps", "4", "--block-length", "8"]
    main(argv)
    tp1 = capsys.readouterr().out
    main(argv + ["--tensor-parallel", "2"])
    tp2 = capsys.readouterr().out
    assert tp2 == tp1 and tp1.strip() != ""
