"""Our uniform sampler (model/uniform.py) generates what transformers' DiffusionGemma generate
does, token for token and decoder pass for decoder pass, per canvas: random canvas start,
temperature schedule, multinomial draws, entropy-bound acceptance, re-drawing, adaptive stopping
(stable and confident), the EOS stop, several canvases over the causal cache.

Randomness is shared, not mocked: transformers draws from the global generator after
torch.manual_seed(seed); ours from a per-request torch.Generator seeded with the same seed, with
the same calls in the same order and shapes. The tiny model's self-conditioning weights are kept
small (tests/model/diffusion_gemma_ref.py says why); its logits agree with transformers' to ~2e-5,
far from any draw's boundary in these cases. Token 14's embedding row is scaled up so some
canvases become stable (adaptive stopping triggers), EOS's so some answers end early.
"""

from __future__ import annotations

import pytest
import torch

from model import load_pretrained
from model.sampling import SamplingParams
from model.uniform import (
    UniformParams,
    entropy_bound_accept,
    generate_uniform,
    step_temperature,
    token_entropy,
)

from .diffusion_gemma_ref import CANVAS, hf_model, save_checkpoint

pytest.importorskip("transformers.models.diffusion_gemma")
PROMPT = [5, 17, 33, 2, 99, 140, 7, 8, 9, 11, 12]  # longer than the sliding window (6)
EOS = 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_model(seed=0)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight[14].mul_(2.5)
        hf.model.decoder.embed_tokens.weight[EOS].mul_(1.3)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("dg-gen"))
    net, tok, cfg = load_pretrained(d, progress=False)
    return hf, net, d


def _reference(hf, seed: int, **kw) -> tuple[list[int], int]:
    """transformers' generate after torch.manual_seed(seed): (answer up to and including the
    first EOS, decoder passes)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    passes = 0
    forward = hf.forward

    def counted(*a, **k):  # generate's decoder_forward is self.forward: one call per step
        nonlocal passes
        passes += 1
        return forward(*a, **k)

    hf.forward = counted
    try:
        torch.manual_seed(seed)
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=kw["max_new_tokens"],
                          max_denoising_steps=kw["max_denoising_steps"],
                          sampler_config=EntropyBoundSamplerConfig(entropy_bound=kw["entropy_bound"]),
                          t_min=0.4, t_max=0.8, stability_threshold=kw["stability_threshold"],
                          confidence_threshold=kw["confidence_threshold"], eos_token_id=EOS,
                          pad_token_id=0)
    finally:
        del hf.forward
    tokens = out.sequences[0, len(PROMPT):].tolist()
    if EOS in tokens:
        tokens = tokens[:tokens.index(EOS) + 1]
    return tokens, passes


CASES = [  # seed, entropy bound, stability threshold, confidence threshold, canvases
    (0, 2.0, 1, 100.0, 3),  # ends at an EOS in canvas 2
    (1, 2.0, 0, 3.0, 3),  # confidence alone stops canvases early
    (2, 4.0, 2, 100.0, 3),  # stability over 2 steps
    (3, 1.0, 1, 3.5, 3),
    (4, 0.3, 1, 0.005, 2),  # the published thresholds: every canvas takes all its steps
    (5, 30.0, 1, 100.0, 2),  # a bound that accepts every position
]


@pytest.mark.parametrize("seed,bound,stab,conf,canvases", CASES)
def test_generation_equals_transformers(models, seed, bound, stab, conf, canvases):
    hf, net, _ = models
    kw = dict(max_new_tokens=canvases * CANVAS, max_denoising_steps=10, entropy_bound=bound,
              stability_threshold=stab, confidence_threshold=conf)
    want, passes = _reference(hf, seed, **kw)
    got = generate_uniform(net, PROMPT, UniformParams(seed=seed, **kw))
    assert got.tokens == want
    assert got.steps == passes
    assert got.finish_reason == ("stop" if want[-1] == EOS else "length")


def test_cases_cover_adaptive_stopping_and_eos(models):
    """The cases above are not vacuous: some canvases stop before their 10 steps, one answer
    ends at EOS, one runs to the length limit."""
    _, net, _ = models
    results = [generate_uniform(net, PROMPT, UniformParams(
        seed=s, max_new_tokens=c * CANVAS, max_denoising_steps=10, entropy_bound=b,
        stability_threshold=st, confidence_threshold=cf)) for s, b, st, cf, c in CASES]
    assert any(r.steps < 10 * r.blocks for r in results)
    assert any(r.finish_reason == "stop" for r in results)
    assert any(r.finish_reason == "length" for r in results)


def test_the_request_seed_fixes_the_answer_and_other_seeds_change_it(models):
    _, net, _ = models
    p = dict(max_new_tokens=2 * CANVAS, max_denoising_steps=4, entropy_bound=1.0)
    a = generate_uniform(net, PROMPT, UniformParams(seed=11, **p)).tokens
    assert a == generate_uniform(net, PROMPT, UniformParams(seed=11, **p)).tokens
    assert a != generate_uniform(net, PROMPT, UniformParams(seed=12, **p)).tokens


def test_max_new_tokens_cuts_inside_a_canvas(models):
    _, net, _ = models
    full = generate_uniform(net, PROMPT, UniformParams(seed=4, max_new_tokens=2 * CANVAS,
                                                       max_denoising_steps=3,
                                                       confidence_threshold=None))
    cut = generate_uniform(net, PROMPT, UniformParams(seed=4, max_new_tokens=CANVAS + 3,
                                                      max_denoising_steps=3,
                                                      confidence_threshold=None))
    if full.finish_reason == "length":
        assert cut.tokens == full.tokens[:CANVAS + 3] and cut.finish_reason == "length"
    assert full.steps == 6 or full.finish_reason == "stop"  # no stopping rule: all 3 steps


def test_entropy_bound_rule():
    """sum - max of the accepted entropies stays under the bound; the lowest is always taken;
    ineligible positions never are."""
    ent = torch.tensor([[0.5, 0.1, 2.0, 0.3, 0.2]])
    acc = entropy_bound_accept(ent, torch.tensor([0.35]))
    # sorted 0.1, 0.2, 0.3, 0.5: sums minus max 0, 0.1, 0.3, 0.6 -> the three lowest
    assert acc.tolist() == [[False, True, False, True, True]]
    assert entropy_bound_accept(ent, torch.tensor([1e-9])).sum() == 1
    elig = torch.tensor([[True, False, True, True, True]])
    acc = entropy_bound_accept(ent, torch.tensor([0.35]), elig)
    assert acc.tolist() == [[False, False, False, True, True]]
    logits = torch.tensor([[[0.0, float("-inf"), 0.0]]])
    assert torch.allclose(token_entropy(logits), torch.tensor([[0.6931472]]))
    t = step_temperature(torch.tensor([10, 5, 1]), torch.tensor([10, 10, 10], dtype=torch.int32),
                         torch.tensor([0.4] * 3), torch.tensor([0.8] * 3))
    assert torch.allclose(t, torch.tensor([0.8, 0.6, 0.44]))


def test_dllm_generate_runs_the_uniform_sampler(models, capsys):
    """`dllm generate --model DIR` on a DiffusionGemma directory: generate_uniform's text, with
    --steps as max_denoising_steps and the checkpoint's generation_config for the rest."""
    from model.cli_generate import main
    from model.uniform import uniform_params

    _, net, d = models
    main(["--model", str(d), "--prompt", "w20 w21 w22", "--max-tokens", str(2 * CANVAS),
          "--steps", "4", "--seed", "5"])
    printed = capsys.readouterr().out.rstrip("\n")
    _, tok, cfg = load_pretrained(d, progress=False)
    p = uniform_params(cfg, SamplingParams(max_new_tokens=2 * CANVAS, steps=4, seed=5))
    want = generate_uniform(net, tok.completion_prompt("w20 w21 w22"), p, tokenizer=tok)
    assert p.max_denoising_steps == 4 and p.entropy_bound == 0.5  # generation_config.json's
    assert printed == want.text
