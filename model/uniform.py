"""Uniform (renoising) diffusion: DiffusionGemma's sampler, as pure per-step functions and a
reference generate() over one sequence.

    params = UniformParams(max_new_tokens=512, max_denoising_steps=48, entropy_bound=0.1, seed=7)
    result = generate_uniform(net, prompt_ids, params)      # -> model.sampling.GenerationResult

The process (transformers' DiffusionGemmaGenerationMixin.generate, step for step):
- The answer is written canvas by canvas (`canvas_length` tokens, 256 for the published model).
  The prompt, then each finished canvas, is encoded causally and its K/V written to the cache.
- A canvas starts as uniformly random tokens (no mask token exists). Step n of N
  (N = max_denoising_steps; transformers counts n down from N to 1) runs the decoder over the
  canvas with the previous step's self-conditioning signal, divides the logits by a linearly
  falling temperature T = t_min + (t_max - t_min) * n / N, draws a prediction per position from
  softmax(logits / T), and accepts the k lowest-entropy predictions for which
  sum(entropies) - max(entropies) <= entropy_bound (the EB-sampler rule, arXiv 2505.24857);
  every position not accepted is re-drawn uniformly at random.
- Adaptive stopping: the canvas is done when its argmax prediction is the same as at the last
  `stability_threshold` steps AND the mean entropy of the scaled logits is under
  `confidence_threshold`; or after N steps. The canvas's tokens are the last step's argmax.
- The answer stops at the first stop token (EOS) of a finished canvas.
- Self-conditioning state: the step's scaled logits become the next step's soft embedding
  (net.soft_embedding), dropped when the canvas ends.

Randomness: every draw (the canvas's initial tokens, the predictions, the re-draws) comes from
the request's own torch.Generator seeded with params.seed, in transformers' order and shapes
(randint [1, C]; per step multinomial over [C, V], then randint [1, C]), so a sequence's tokens do
not depend on what else runs beside it, and `torch.manual_seed(seed)` before transformers'
generate gives the same draws (the tests use that). The engine (engine/uniform_batch.py) calls
the same `uniform_step` per batch, which is why its tokens equal this reference's.

`entropy_bound_accept` is also the masked models' `remasking: "entropy_bound"` rule
(model/sampling.commit_step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig

# transformers' DiffusionGemmaGenerationConfig defaults (its generation_config.json may differ)
DEFAULT_STEPS = 48
DEFAULT_ENTROPY_BOUND = 0.1


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, as torch.distributions.Categorical computes
    it (normalised logits clamped at the dtype's min, so -inf logits add 0). [..., V] -> [...]."""
    lp = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(lp, dim=-1)
    return -(lp.clamp(min=torch.finfo(lp.dtype).min) * probs).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor,
                         eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The EB-sampler's acceptance: per row, the k lowest-entropy positions whose summed entropy
    minus the largest of them is <= bound (always at least the lowest one).

    entropy [B, L] float; bound [B]; eligible bool [B, L] (None = all; ineligible positions are
    never accepted and do not count). -> accepted bool [B, L]."""
    if eligible is not None:
        entropy = entropy.masked_fill(~eligible, float("inf"))
    srt, order = torch.sort(entropy, dim=-1)  # ascending, stable ties by position
    cum = torch.cumsum(srt, dim=-1)
    # srt is the running max of the sorted entropies, so cum - srt is "sum minus the largest"
    take = (cum - srt) <= bound[:, None]
    if eligible is not None:
        take = take & torch.isfinite(srt)
    return torch.zeros_like(take).scatter(-1, order, take)


def step_temperature(steps_left: torch.Tensor, n_steps: torch.Tensor, t_min: torch.Tensor,
                     t_max: torch.Tensor) -> torch.Tensor:
    """T = t_min + (t_max - t_min) * steps_left / n_steps, in float32 as transformers computes it
    (an int32 step over an int step count, then float32 arithmetic). All [B]."""
    frac = steps_left.to(torch.int32) / n_steps
    return t_min + (t_max - t_min) * frac


@dataclass
class StepOutcome:
    """One uniform step for B rows (everything [B, ...]; the caller keeps what it needs)."""
    canvas: torch.Tensor  # [B, C] the next canvas: accepted predictions, the rest re-drawn
    argmax: torch.Tensor  # [B, C] the argmax of the scaled logits (the canvas's answer so far)
    accepted: torch.Tensor  # [B, C] bool
    scaled: torch.Tensor  # [B, C, V] the temperature-scaled logits (self-conditioning's source)
    mean_entropy: torch.Tensor  # [B]


def uniform_step(logits: torch.Tensor, canvas: torch.Tensor, temperature: torch.Tensor,
                 bound: torch.Tensor, generators: list[torch.Generator]) -> StepOutcome:
    """The sampler's step after the decoder: logits [B, C, V] (soft-capped float32), canvas [B, C]
    (the tokens the decoder saw), temperature / bound [B], one generator per row (its draws:
    multinomial over [C, V], then randint [1, C])."""
    B, C, V = logits.shape
    scaled = logits / temperature[:, None, None]
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    drawn = torch.empty(B, C, dtype=torch.long, device=logits.device)
    noise = torch.empty(B, C, dtype=torch.long, device=logits.device)
    for b, g in enumerate(generators):  # per row, so a row's draws ignore its batch
        drawn[b] = torch.multinomial(probs[b], num_samples=1, generator=g)[:, 0]
        noise[b] = torch.randint(0, V, (1, C), generator=g, device=logits.device)[0]
    entropy = token_entropy(scaled)  # [B, C]
    accepted = entropy_bound_accept(entropy, bound)
    nxt = torch.where(accepted, drawn, noise)
    return StepOutcome(canvas=nxt, argmax=scaled.argmax(-1), accepted=accepted, scaled=scaled,
                       mean_entropy=entropy.mean(-1))


def random_canvas(canvas_length: int, vocab_size: int, generator: torch.Generator,
                  device=None) -> torch.Tensor:
    """A fresh canvas [C] of uniformly random tokens (transformers' initialize_canvas, one row)."""
    return torch.randint(0, vocab_size, (1, canvas_length), generator=generator, device=device)[0]


def is_stable(history: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """history [B, S, C] (the last S argmax canvases, -1 before there were S), argmax [B, C] ->
    bool [B]: the same as each of them (S = 0: always)."""
    if history.shape[1] == 0:
        return torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    return (history == argmax[:, None, :]).all(-1).all(-1)


def push_history(history: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """The history with argmax [B, C] as its newest entry (the oldest dropped)."""
    if history.shape[1] == 0:
        return history
    return torch.cat([history[:, 1:], argmax[:, None]], dim=1)


@dataclass
class UniformParams:
    max_new_tokens: int = 256
    max_denoising_steps: int = DEFAULT_STEPS
    entropy_bound: float = DEFAULT_ENTROPY_BOUND
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float | None = 0.005  # None: no adaptive stopping (always N steps)
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # default: the model's EOS (and end-of-turn)

    def validate(self) -> UniformParams:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_denoising_steps < 1:
            raise ValueError("max_denoising_steps must be >= 1")
        if not self.entropy_bound > 0:
            raise ValueError("entropy_bound must be > 0")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError("temperatures need 0 <= t_min < t_max")
        if self.stability_threshold < 0:
            raise ValueError("stability_threshold must be >= 0")
        if self.confidence_threshold is not None and not self.confidence_threshold > 0:
            raise ValueError("confidence_threshold must be > 0")
        return self


def uniform_params(cfg: ModelConfig, params) -> UniformParams:
    """A request's uniform-diffusion settings: its SamplingParams (max_denoising_steps, else its
    steps, which is what the step router sets; entropy_bound; seed; stops) over the model's
    generation_config.json (cfg.extra["uniform_defaults"], written by the loader) over
    transformers' defaults. SamplingParams' temperature and top_p do not apply: the process has
    its own temperature schedule (t_min, t_max)."""
    d = cfg.extra.get("uniform_defaults", {})
    steps = params.max_denoising_steps if params.max_denoising_steps is not None else params.steps
    bound = params.entropy_bound if params.entropy_bound is not None \
        else d.get("entropy_bound", DEFAULT_ENTROPY_BOUND)
    return UniformParams(
        max_new_tokens=params.max_new_tokens, max_denoising_steps=int(steps),
        entropy_bound=float(bound), t_min=float(d.get("t_min", 0.4)),
        t_max=float(d.get("t_max", 0.8)), stability_threshold=int(d.get("stability_threshold", 1)),
        confidence_threshold=d.get("confidence_threshold", 0.005), seed=params.seed,
        stop=list(params.stop), stop_token_ids=params.stop_token_ids)


def n_steps_done(params: UniformParams, steps_left: int) -> int:
    """The 0-based index of the step that runs with `steps_left` steps left (N .. 1)."""
    return params.max_denoising_steps - steps_left


def canvases_for(max_new_tokens: int, canvas_length: int) -> int:
    return math.ceil(max_new_tokens / canvas_length)


@torch.no_grad()
def generate_uniform(net, prompt_ids: list[int], params: UniformParams, *, tokenizer=None,
                     on_step: Callable[[list[int], dict], None] | None = None):
    """DiffusionGemma's generation for one prompt (module docstring). on_step(tokens, info) sees
    the answer so far after every step: the finished canvases, then the current one with its
    accepted predictions and cfg.mask_id at the re-drawn positions; info: block (canvas), step
    (in it), steps (in all), accepted. -> model.sampling.GenerationResult."""
    from model.diffusion_gemma import GemmaCache
    from model.rules import stop_token_ids
    from model.sampling import GenerationResult, answer_text

    params.validate()
    cfg: ModelConfig = net.cfg
    C, V = net.shape.canvas_length, cfg.vocab_size
    P, n_canvas = len(prompt_ids), canvases_for(params.max_new_tokens, net.shape.canvas_length)
    if P + n_canvas * C > cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + {n_canvas} canvases of {C} exceed the model's context "
                         f"({cfg.max_seq_len})")
    dev = next(net.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    stop_ids = stop_token_ids(cfg, params.stop_token_ids)
    cache = GemmaCache(net, batch=1, max_len=P + n_canvas * C)
    if P:
        net.encode(torch.tensor([prompt_ids], device=dev), torch.arange(P, device=dev)[None],
                   cache.context(causal=True))
    one = lambda x, dtype=torch.float32: torch.tensor([x], dtype=dtype, device=dev)  # noqa: E731
    n_steps, bound = one(params.max_denoising_steps, torch.int32), one(params.entropy_bound)
    t_min, t_max = one(params.t_min), one(params.t_max)
    tokens: list[int] = []
    steps, finish = 0, "length"
    for c in range(n_canvas):
        pos = torch.arange(P + c * C, P + (c + 1) * C, device=dev)[None]
        canvas = random_canvas(C, V, gen, dev)[None]  # [1, C]
        argmax = canvas
        history = torch.full((1, params.stability_threshold, C), -1, dtype=torch.long, device=dev)
        sc = None
        for n in range(params.max_denoising_steps, 0, -1):
            logits = net.denoise(canvas, pos, cache.context(), sc)  # [1, C, V]
            temp = step_temperature(one(n, torch.int32), n_steps, t_min, t_max)
            out = uniform_step(logits, canvas, temp, bound, [gen])
            steps += 1
            stop = False
            if params.confidence_threshold is not None:
                stop = bool(is_stable(history, out.argmax)[0]) and \
                    bool(out.mean_entropy[0] < params.confidence_threshold)
                history = push_history(history, out.argmax)
            canvas, argmax = out.canvas, out.argmax
            sc = net.soft_embedding(out.scaled)
            if on_step is not None:  # re-drawn positions shown as cfg.mask_id (no token)
                shown = torch.where(out.accepted[0], canvas[0], cfg.mask_id).tolist()
                on_step(tokens + shown, {"block": c, "step": n_steps_done(params, n),
                                         "steps": steps, "accepted": out.accepted[0].tolist()})
            if stop:
                break
        done = argmax[0].tolist()
        stop_at = next((i for i, t in enumerate(done) if t in stop_ids), None)
        if stop_at is not None:
            tokens += done[:stop_at + 1]
            finish = "stop"
            break
        tokens += done
        if tokenizer is not None and params.stop and \
                any(s in tokenizer.decode(tokens) for s in params.stop):
            finish = "stop"
            break
        if c < n_canvas - 1:  # the finished canvas becomes causal context for the next
            net.encode(argmax, pos, cache.context(causal=True))
    if finish == "length":
        tokens = tokens[:params.max_new_tokens]
    text, finish = answer_text(tokens, stop_ids, tokenizer, params.stop, finish)
    return GenerationResult(tokens=tokens, finish_reason=finish, steps=steps,
                            blocks=min(c + 1, n_canvas), text=text)
