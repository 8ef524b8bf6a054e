"""Fast-dLLM v2 (`Fast_dLLM_Qwen`, NVlabs) loads natively and samples as its authors' generate().

A tiny random checkpoint in its published format (Qwen2 tensor names with q/k/v biases, config
fields of Fast_dLLM_QwenConfig with `bd_size`, the `|<MASK>|` token in tokenizer.json, the hub's
Python files that must never run) is loaded with load_pretrained and checked against:
- transformers' own Qwen2ForCausalLM on the same weights: block-causal with blocks of 1 is the
  causal mask, and Fast-dLLM reads logits shifted by one (hidden state i-1 predicts token i);
- an independent float64 forward written here from the hub modeling.py (block-causal over blocks
  aligned to position 0, eval_block_diff_mask: key j visible to query i iff j // B <= i // B);
- an independent re-implementation of the hub modeling.py `generate` (batch 1: prefill of the
  prompt's whole blocks, the autoregressive token that opens each block, sub-blocks of
  `small_block_size` decoded by `threshold` with at least the most confident, shifted logits,
  `sample_with_top_p`, stop token <|im_end|>) on that forward: same tokens as our reference
  sampler at temperature 0, and when sampling given the same Gumbel draws (the authors draw with
  torch.multinomial, which a server cannot share; the draws here use kernels/noise.py's keys);
- the engine, in mixed and staggered batches: the reference sampler's tokens.
Sharded (index + shards) loading equals single-file loading.
Deviations kept in the reference too: [MASK] is never predicted (our samplers ban it), and a
prompt of exactly one block is prefilled (the authors' `if input_ids.shape[1] > block_size`
skips the prefill there and the first block's forward never sees the prompt: a bug).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.types import GenerationRequest
from kernels.noise import gumbel, uniform_noise
from model import load_pretrained
from model.diffusion import block_causal_mask
from model.families import family_defaults
from model.sampling import SamplingParams, generate
from model.transformer import DenseAttention
from tests.engine.conftest import make_engine, run_like_reference
from tests.model.test_loaders import (
    DREAM_TEMPLATE,
    TRAP,
    _all_reduce_forward,
    _reassemble,
    assert_close,
    heads,
    llama_weights,
    merge,
    ref_rmsnorm,
    ref_rotate_half_rope,
    write_checkpoint,
    write_tokenizer_json,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"]
D, M, H, HKV = 32, 80, 4, 2


def make_fast_dllm(d, seed: int = 5, shards: int = 1, tie: bool = False):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, SPECIALS, {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": DREAM_TEMPLATE,
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 512})
    for f in ("modeling.py", "configuration.py"):
        (d / f).write_text(TRAP)
    vocab = max(ids.values()) + 1 + 4
    c = {"model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"],
         "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                      "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
         "hidden_size": D, "intermediate_size": M, "num_hidden_layers": 2,
         "num_attention_heads": H, "num_key_value_heads": HKV, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "vocab_size": vocab, "max_position_embeddings": 512,
         "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
         "tie_word_embeddings": tie, "hidden_act": "silu", "use_sliding_window": False,
         "sliding_window": 4096, "max_window_layers": 2, "rope_scaling": None,
         "attention_dropout": 0.0, "bd_size": 8, "torch_dtype": "bfloat16"}
    W = llama_weights(torch.Generator().manual_seed(seed), vocab, D, M, H, HKV, qkv_bias=True)
    # a confident head (median top-1 probability ~0.75, as a trained model's), so thresholds
    # of 0.5-0.9 commit several tokens in some steps and one in others
    W["lm_head.weight"] = W["lm_head.weight"] * 6
    if tie:
        del W["lm_head.weight"]
    write_checkpoint(d, c, W, shards)
    return W, c, ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast_dllm")
    W, c, ids = make_fast_dllm(d)
    return d, W, c, ids


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_pretrained(ckpt[0], progress=False)


# --------------------------------------------------------------------------------------------
# the forward, from the hub modeling.py (float64)
# --------------------------------------------------------------------------------------------
def ref_forward(W, c, ids, block: int):
    """Unshifted logits [1, T, V]: hidden state i's own logits, as Fast_dLLM_QwenForCausalLM
    returns them, under its eval mask (blocks of `block` aligned to position 0)."""
    W = {k: v.double() for k, v in W.items()}
    T = ids.shape[1]
    q_blk, k_blk = torch.arange(T)[:, None] // block, torch.arange(T)[None, :] // block
    allowed = q_blk >= k_blk
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."

        def proj(h, n, b=b):  # q/k/v always with a bias (its attention: bias=True)
            return h @ W[f"{b}self_attn.{n}_proj.weight"].T + W[f"{b}self_attn.{n}_proj.bias"]

        h = ref_rmsnorm(x, W[b + "input_layernorm.weight"], c["rms_norm_eps"])
        q = ref_rotate_half_rope(heads(proj(h, "q"), H), c["rope_theta"])
        k = ref_rotate_half_rope(heads(proj(h, "k"), HKV), c["rope_theta"])
        v = heads(proj(h, "v"), HKV)
        k, v = (torch.repeat_interleave(t, H // HKV, dim=1) for t in (k, v))
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
        x = x + merge(torch.softmax(s, -1) @ v) @ W[b + "self_attn.o_proj.weight"].T
        h = ref_rmsnorm(x, W[b + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        x = x + (F.silu(h @ W[b + "mlp.gate_proj.weight"].T) * (h @ W[b + "mlp.up_proj.weight"].T)) \
            @ W[b + "mlp.down_proj.weight"].T
    x = ref_rmsnorm(x, W["model.norm.weight"], c["rms_norm_eps"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def ours(net, ids, block: int):
    """Our net over ids with blocks aligned to position 0: shifted logits [1, T, V]."""
    seg = (torch.arange(ids.shape[1]) // block)[None]
    return net(ids, attn=DenseAttention(block_causal_mask(seg)))


def test_config_and_ids(loaded, ckpt):
    net, tok, cfg = loaded
    ids = ckpt[3]
    assert (cfg.mask_id, cfg.eos_id, cfg.eot_id) == (ids["|<MASK>|"], ids["<|im_end|>"],
                                                     ids["<|im_end|>"])
    assert cfg.attention == "block_causal" and cfg.block_align == "zero"
    assert cfg.block_length == 32 and cfg.logit_shift and cfg.qkv_bias  # not config bd_size 8
    assert not any(p.with_suffix(".RAN").exists() for p in ckpt[0].glob("*.py"))


def test_logits_equal_transformers_qwen2_shifted(loaded, ckpt):
    """Blocks of 1 are the causal mask: our net == transformers' Qwen2 on the same weights,
    read one position later (the shift)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    net, _, _ = loaded
    _, W, c, _ = ckpt
    hf_cfg = Qwen2Config(vocab_size=c["vocab_size"], hidden_size=D, intermediate_size=M,
                         num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=HKV,
                         rms_norm_eps=1e-6, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_cfg).double().eval()
    missing, unexpected = hf.load_state_dict({k: v.double() for k, v in W.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(0, c["vocab_size"], (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
        got = ours(net, ids, 1)
    assert_close(got, torch.cat([theirs[:, :1], theirs[:, :-1]], 1))


@pytest.mark.parametrize("block", [32, 8])
def test_logits_equal_the_reference_block_causal_forward(loaded, ckpt, block):
    net, _, _ = loaded
    _, W, c, _ = ckpt
    ids = torch.randint(0, c["vocab_size"], (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_forward(W, c, ids, block)
        assert_close(ours(net, ids, block), torch.cat([ref[:, :1], ref[:, :-1]], 1))


def test_sharded_equals_single_file_and_tied_head_loads(tmp_path, ckpt):
    net1, _, _ = load_pretrained(ckpt[0], progress=False)
    make_fast_dllm(tmp_path / "sharded", shards=3)
    net3, _, _ = load_pretrained(tmp_path / "sharded", progress=False)
    for (n1, p1), (n3, p3) in zip(net1.state_dict().items(), net3.state_dict().items(),
                                  strict=True):
        assert n1 == n3 and torch.equal(p1, p3), n1
    W, c, _ = make_fast_dllm(tmp_path / "tied", tie=True)
    net_t, _, cfg_t = load_pretrained(tmp_path / "tied", progress=False)
    assert cfg_t.tie_embeddings
    ids = torch.randint(0, c["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_forward(W, c, ids, 32)
        assert_close(ours(net_t, ids, 32), torch.cat([ref[:, :1], ref[:, :-1]], 1))


def test_tensor_parallel_slices_equal_single_file(ckpt):
    """Each of 2 ranks reads its slice (q/k/v with their biases by heads); the slices reassemble
    to the full weights and, summed after the row-parallel layers, give the full logits."""
    full, _, _ = load_pretrained(ckpt[0], progress=False)
    ranks = [load_pretrained(ckpt[0], tp_rank=r, tp_size=2, progress=False)[0] for r in range(2)]
    parts = [r.state_dict() for r in ranks]
    for name, t in full.state_dict().items():
        assert torch.equal(_reassemble(parts, name), t), name
    assert parts[0]["layers.0.attn.wq.bias"].shape[0] == D // 2
    x = torch.randint(0, full.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    # float64: split-and-summed matmuls round differently from whole ones (float32 differed by
    # 1.4e-5 on an AVX2 CPU), and in float64 that difference is far below any slicing mistake
    full, ranks = full.double(), [r.double() for r in ranks]
    with torch.no_grad():
        want = full(x)
    for got in _all_reduce_forward(ranks, x):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# the authors' generate(), batch 1, written from the hub modeling.py
# --------------------------------------------------------------------------------------------
def fast_dllm_generate(W, c, prompt, max_new_tokens, *, mask_id, stop_token, block_size=32,
                       small_block_size=8, threshold=0.9, temperature=0.0, top_p=0.95, seed=0):
    def logits_of(x):  # unshifted float32 logits [T, V], [MASK] never predicted (our ban)
        out = ref_forward(W, c, torch.tensor([x]), block_size)[0].float()
        out[:, mask_id] = float("-inf")
        return out

    x, P = list(prompt), len(prompt)
    num_blocks = max_new_tokens // block_size
    if P >= block_size and P % block_size == 0:  # authors: P > block_size (see the docstring)
        x.append(int(logits_of(x)[-1].argmax()))
    for _ in range(num_blocks):
        if stop_token in x[P:]:
            break
        prompt_length = len(x)
        x += [mask_id] * (block_size - len(x) % block_size)
        start, step = len(x) - block_size, 0

        def stopped(x=x, prompt_length=prompt_length):  # x grows in place: the same list
            gen = x[prompt_length:]
            return stop_token in gen and mask_id not in gen[:gen.index(stop_token)]

        while True:
            if stopped():
                break
            if mask_id not in x[-block_size:]:
                x.append(int(logits_of(x)[-1].argmax()))  # the next block's AR token
                break
            for sb in range(block_size // small_block_size):
                s0, s1 = start + sb * small_block_size, start + (sb + 1) * small_block_size
                while mask_id in x[s0:s1] and not stopped():
                    lg = logits_of(x)
                    # shifted within the block's forward: its first position keeps its own
                    shifted = torch.cat([lg[start:start + 1], lg[start:len(x) - 1]])
                    sub = shifted[s0 - start:s1 - start]
                    x1, p = sample_with_top_p(sub, top_p, temperature, seed,
                                              torch.arange(s0, s1), step)
                    conf = p.gather(-1, x1[:, None])[:, 0]
                    masked = torch.tensor([t == mask_id for t in x[s0:s1]])
                    conf = torch.where(masked, conf, torch.tensor(-math.inf))
                    unmask = conf > threshold
                    unmask[conf.argmax()] = True
                    unmask &= masked
                    for j in unmask.nonzero()[:, 0].tolist():
                        x[s0 + j] = int(x1[j])
                    step += 1
    gen = x[P:]
    return gen[:gen.index(stop_token) + 1] if stop_token in gen else gen


def sample_with_top_p(logits, top_p, temperature, seed, positions, step):
    """The hub's sample_with_top_p; multinomial replaced by Gumbel-max with the server's noise."""
    if temperature <= 0:
        p = torch.softmax(logits, dim=-1)
        return p.argmax(dim=-1), p
    z = logits / temperature
    probs = F.softmax(z, dim=-1)
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)
    remove = torch.cumsum(sorted_probs, dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    remove = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    probs[remove] = 0
    p = probs / probs.sum(-1, keepdim=True)
    n = logits.shape[0]
    g = gumbel(uniform_noise(torch.full((n,), seed), positions, torch.full((n,), step),
                             logits.shape[1]))
    return z.masked_fill(remove, float("-inf")).add(g).argmax(-1), p


def family_params(cfg, n, **kw):
    return SamplingParams(**(family_defaults(cfg).sampling_kwargs(n) | kw))


CASES = [  # prompt length: mid-block, a whole block and more, two whole blocks (AR at once)
    ("def add(a, b):", 40, {}),
    ("the quick brown fox jumps over the lazy dog. " * 3, 48, {"confidence_threshold": 0.5}),
    (None, 40, {"confidence_threshold": 0.6}),
    ("Hello, world!", 64, {"temperature": 0.8, "seed": 3}),
    ("for i in range(10): print(i)" * 2, 40, {"temperature": 1.0, "top_p": 0.9, "seed": 4,
                                              "confidence_threshold": 0.5}),
]


def _prompt(tok, text):
    if text is None:  # exactly two blocks: the canvas opens with the AR token after the prefill
        return (tok.encode("def add(a, b):\n    return a + b\n") * 8)[:64]
    return tok.encode(text)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_sampler_equals_the_authors_generate(loaded, ckpt, case):
    net, tok, cfg = loaded
    _, W, c, _ = ckpt
    text, n, kw = CASES[case]
    prompt = _prompt(tok, text)
    params = family_params(cfg, n, **kw)
    assert (params.sub_block_length, params.ar_block_start, params.block_length) == (8, True, 32)
    out = generate(net, prompt, params)
    ref = fast_dllm_generate(W, c, prompt, n + 2 * 32, mask_id=cfg.mask_id, stop_token=cfg.eos_id,
                             threshold=params.confidence_threshold,
                             temperature=params.temperature, top_p=params.top_p, seed=params.seed)
    assert out.tokens == ref[:n]
    if params.confidence_threshold < 0.7:  # a low threshold commits several tokens per step
        sched = params.schedule_for(len(prompt), cfg)  # the canvas runs to a block boundary
        assert out.steps < sched.max_new_tokens - sched.n_blocks


def _stop_token(net, tok, cfg, prompt):
    """A token the model commits early in the first block: a stop token that ends mid-block."""
    out = generate(net, prompt, family_params(cfg, 32, stop_token_ids=[])).tokens
    return out[len(out) // 4]


def test_stop_token_ends_the_block_as_the_authors_generate(loaded, ckpt):
    """stop_in_block: once a stop token is committed with nothing masked before it the block is
    left (the authors' generate breaks there): their tokens, fewer steps than finishing it."""
    net, tok, cfg = loaded
    _, W, c, _ = ckpt
    prompt = _prompt(tok, "def add(a, b):")
    stop = _stop_token(net, tok, cfg, prompt)
    params = family_params(cfg, 40, stop_token_ids=[stop])
    out = generate(net, prompt, params)
    ref = fast_dllm_generate(W, c, prompt, 40 + 64, mask_id=cfg.mask_id, stop_token=stop,
                             threshold=params.confidence_threshold)
    assert out.finish_reason == "stop" and out.tokens == ref[:40] and out.tokens[-1] == stop
    full = generate(net, prompt, family_params(cfg, 40, stop_token_ids=[stop],
                                               stop_in_block=False))
    assert full.tokens == out.tokens and full.steps > out.steps


def test_sub_blocks_and_ar_token_change_the_answer(loaded):
    """Without sub-blocks or the AR token the sampler is another one: both options act."""
    net, tok, cfg = loaded
    prompt = _prompt(tok, None)
    base = generate(net, prompt, family_params(cfg, 40, confidence_threshold=0.6)).tokens
    for kw in ({"sub_block_length": None}, {"ar_block_start": False}):
        assert generate(net, prompt, family_params(cfg, 40, confidence_threshold=0.6,
                                                   **kw)).tokens != base


async def test_engine_mixed_staggered_batch_equals_reference(ckpt):
    net, tok, cfg = load_pretrained(ckpt[0], progress=False, dtype=torch.float64)
    reqs = [GenerationRequest(f"f{i}", _prompt(tok, text),
                              family_params(cfg, n, stop_token_ids=[], **kw))
            for i, (text, n, kw) in enumerate(CASES)]
    reqs.append(GenerationRequest("plain", _prompt(tok, "x = 1"), family_params(
        cfg, 24, stop_token_ids=[], sub_block_length=None, confidence_threshold=None)))
    for i, text in enumerate(["def add(a, b):", "Hello, world!"]):  # stops inside a block
        prompt = _prompt(tok, text)
        reqs.append(GenerationRequest(f"stop{i}", prompt, family_params(
            cfg, 40, stop_token_ids=[_stop_token(net, tok, cfg, prompt)])))
    await run_like_reference(make_engine(net, tok, max_num_seqs=3), net, tok, reqs, every=2)
