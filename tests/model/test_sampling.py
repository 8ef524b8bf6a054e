import pytest
import torch

from model.diffusion import block_causal_mask, segment_ids
from model.sampling import SamplingParams, commit_step, generate
from model.transformer import DenseAttention

from .conftest import tiny_config, tiny_net

PROMPT = list(range(20, 40))


@pytest.fixture(scope="module")
def net():
    return tiny_net(tiny_config())


@pytest.mark.parametrize("kw", [
    dict(), dict(remasking="margin"), dict(remasking="entropy"), dict(remasking="random"),
    dict(temperature=0.8, seed=5), dict(temperature=1.0, top_p=0.9, seed=1),
    dict(confidence_threshold=0.01), dict(block_length=1, steps=1), dict(block_length=8, steps=3),
])
def test_cache_and_recompute_give_same_tokens(net, kw):
    a = generate(net, PROMPT, SamplingParams(max_new_tokens=40, **kw))
    b = generate(net, PROMPT, SamplingParams(max_new_tokens=40, use_cache=False, **kw))
    c = generate(net, PROMPT, SamplingParams(max_new_tokens=40, fused_commit=True, **kw))
    assert a.tokens == b.tokens == c.tokens
    assert a.steps == b.steps == c.steps


def test_seed_determinism(net):
    p = dict(max_new_tokens=32, temperature=1.0)
    a = generate(net, PROMPT, SamplingParams(seed=1, **p)).tokens
    assert a == generate(net, PROMPT, SamplingParams(seed=1, **p)).tokens
    assert a != generate(net, PROMPT, SamplingParams(seed=2, **p)).tokens


def test_steps_per_block_counts_forward_passes(net):
    r = generate(net, PROMPT, SamplingParams(max_new_tokens=64, steps=4, block_length=32,
                                             stop_token_ids=[]))
    assert r.steps == 8 and r.blocks == 2 and len(r.tokens) == 64


def test_temperature_zero_commits_argmax(net):
    """The first step commits the single most confident argmax prediction."""
    cfg = net.cfg
    seen = []
    generate(net, PROMPT, SamplingParams(max_new_tokens=8, steps=8, block_length=8),
             on_step=lambda canvas, info: seen.append(list(canvas)))
    ids = torch.tensor([PROMPT + [cfg.mask_id] * 8])
    seg = segment_ids(ids.shape[1], torch.tensor([len(PROMPT)]), 8)
    t = torch.zeros(1, ids.shape[1])
    t[:, len(PROMPT):] = 1.0
    logits = net(ids, t=t, attn=DenseAttention(block_causal_mask(seg)))[0, len(PROMPT):]
    logits[:, cfg.mask_id] = float("-inf")
    logits[:, cfg.pad_id] = float("-inf")
    probs = logits.softmax(-1)
    conf, tok = probs.max(-1)
    j = int(conf.argmax())
    first = seen[0]
    committed = [i for i, x in enumerate(first) if x != cfg.mask_id]
    assert committed == [j] and first[j] == int(tok[j])


def test_block_length_one_is_greedy_autoregressive(net):
    """Block 1, one step: each token is the argmax given the clean prefix."""
    cfg = net.cfg
    r = generate(net, PROMPT, SamplingParams(max_new_tokens=6, steps=1, block_length=1,
                                             stop_token_ids=[]))
    seq = list(PROMPT)
    for _ in range(6):
        ids = torch.tensor([seq + [cfg.mask_id]])
        t = torch.zeros(1, len(seq) + 1)
        t[0, -1] = 1.0
        seg = segment_ids(len(seq) + 1, torch.tensor([len(PROMPT)]), 1)
        logits = net(ids, t=t, attn=DenseAttention(block_causal_mask(seg)))[0, -1]
        logits[[cfg.mask_id, cfg.pad_id]] = float("-inf")
        seq.append(int(logits.argmax()))
    assert r.tokens == seq[len(PROMPT):]


def test_confidence_threshold_commits_at_least_one_per_step(net):
    counts = []
    prev = [0]

    def on_step(canvas, info):
        n = sum(t != net.cfg.mask_id for t in canvas)
        counts.append(n - prev[0])
        prev[0] = n

    r = generate(net, PROMPT, SamplingParams(max_new_tokens=16, steps=16, block_length=16,
                                             confidence_threshold=0.999), on_step=on_step)
    assert all(c >= 1 for c in counts)
    assert len(r.tokens) == 16 or r.finish_reason == "stop"


def test_early_stop_after_eos():
    cfg = tiny_config()
    net = tiny_net(cfg)
    with torch.no_grad():  # make EOS overwhelmingly likely everywhere
        net.lm_head.weight.data[cfg.eos_id] += 5.0 * net.norm.weight.data.sign()
    r = generate(net, PROMPT, SamplingParams(max_new_tokens=96, steps=4, block_length=32))
    assert r.finish_reason == "stop"
    assert r.tokens[-1] == cfg.eos_id and r.tokens.count(cfg.eos_id) == 1
    assert r.blocks == 1 and r.steps <= 4


def test_full_attention_fim_keeps_prefix_and_suffix(net):
    cfg = tiny_config(attention="full", time_conditioning=False)
    full = tiny_net(cfg)
    suffix = [7, 8, 9, 10]
    seen = []
    # the sampler must only ever write into the canvas between prompt and suffix
    r = generate(full, PROMPT, SamplingParams(max_new_tokens=16, steps=4, block_length=8,
                                              stop_token_ids=[]),
                 suffix_ids=suffix, on_step=lambda c, i: seen.append(c))
    assert len(r.tokens) == 16 and all(len(c) == 16 for c in seen)


def test_block_causal_rejects_suffix(net):
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        generate(net, PROMPT, SamplingParams(max_new_tokens=8), suffix_ids=[1])


def test_too_long_prompt_is_an_error(net):
    with pytest.raises(ValueError, match="context"):
        generate(net, list(range(10, 500)), SamplingParams(max_new_tokens=64))


def test_commit_step_rows_are_independent():
    """A row's commits do not depend on the other rows in the batch."""
    torch.manual_seed(0)
    V, Lb = 50, 6
    logits = torch.randn(3, Lb, V)
    block = torch.zeros(3, Lb, dtype=torch.long)  # all masked (mask id 0)
    pos = torch.arange(Lb).expand(3, Lb) + 100
    kw = dict(mask_id=0, temperature=torch.tensor([0.0, 1.0, 1.0]), top_p=torch.ones(3),
              seeds=torch.tensor([1, 2, 3]), threshold=torch.full((3,), float("nan")),
              last_step=torch.zeros(3, dtype=torch.bool))
    out, _ = commit_step(logits, block, pos, torch.zeros(3, dtype=torch.long),
                         torch.tensor([2, 3, 1]), rules=["low_confidence", "margin", "random"], **kw)
    for i in range(3):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        o, _ = commit_step(logits[i:i + 1], block[i:i + 1], pos[i:i + 1],
                           torch.zeros(1, dtype=torch.long), torch.tensor([[2, 3, 1][i]]),
                           rules=[["low_confidence", "margin", "random"][i]], **one)
        assert torch.equal(o[0], out[i])
    assert [(out[i] != 0).sum().item() for i in range(3)] == [2, 3, 1]


def test_stop_strings_cut_text(small_tokenizer):
    """A stop string ends the answer after the block it appears in, and the text a user gets
    is cut just before it (this seed's tiny net writes "urnurn f f f f furn f f ..." greedily)."""
    tok = small_tokenizer
    net = tiny_net(tiny_config(tok))
    prompt, stop = tok.encode("def f(x):\n"), " furn"
    params = dict(max_new_tokens=32, steps=4, block_length=8)
    free = generate(net, prompt, SamplingParams(**params), tokenizer=tok)
    assert free.finish_reason == "length" and stop in free.text
    r = generate(net, prompt, SamplingParams(stop=[stop], **params), tokenizer=tok)
    assert r.finish_reason == "stop"
    assert r.text == free.text[:free.text.index(stop)] and stop not in r.text
    assert r.blocks < free.blocks  # generation ended early, not just the text cut
    assert free.tokens[:len(r.tokens)] == r.tokens


def test_deferred_tokens_are_committed_last():
    """A deferred token loses the step even when it is the most confident prediction, and is
    still committed when nothing else is left."""
    V = 20
    logits = torch.full((1, 3, V), -5.0)
    logits[0, 0, 5] = 9.0  # most confident: token 5 at position 0
    logits[0, 1, 7] = 4.0
    logits[0, 2, 8] = 3.0
    block = torch.zeros(1, 3, dtype=torch.long)
    kw = dict(mask_id=0, rules=["low_confidence"], temperature=torch.zeros(1), top_p=torch.ones(1),
              seeds=torch.zeros(1, dtype=torch.long), threshold=torch.full((1,), float("nan")))
    step = (logits, block, torch.arange(3)[None], torch.zeros(1, dtype=torch.long),
            torch.ones(1, dtype=torch.long))
    plain, _ = commit_step(*step, last_step=torch.zeros(1, dtype=torch.bool), **kw)
    assert plain.tolist() == [[5, 0, 0]]
    deferred, _ = commit_step(*step, last_step=torch.zeros(1, dtype=torch.bool),
                              defer_ids=[[5]], **kw)
    assert deferred.tolist() == [[0, 7, 0]]
    final, _ = commit_step(*step, last_step=torch.ones(1, dtype=torch.bool), defer_ids=[[5]], **kw)
    assert final.tolist() == [[5, 7, 8]]


def test_token_healing_backs_off_trailing_whitespace(small_tokenizer):
    from model.healing import heal_prompt

    tok = small_tokenizer
    ids = tok.encode("def f(x):\n")
    healed_ids, text, allowed = heal_prompt(tok, ids)
    assert text and not text.strip() and healed_ids == ids[:len(healed_ids)]
    assert tok.decode(healed_ids) + text == "def f(x):\n"
    assert all(tok.decode([i]).startswith(text) for i in allowed)
    assert heal_prompt(tok, tok.encode("x = 1")) == (tok.encode("x = 1"), "", None)
    cfg = tiny_config(tok)
    net = tiny_net(cfg)
    r = generate(net, healed_ids, SamplingParams(max_new_tokens=8, steps=8, block_length=8,
                                                 first_token_ids=allowed), tokenizer=tok)
    assert r.tokens[0] in allowed
