"""Sampler defaults per model family, as each family's authors publish them.

    d = family_defaults(cfg)                         # cfg.extra["family"], set by the loaders
    params = SamplingParams(**d.sampling_kwargs(max_new_tokens=256))

| family     | block_length    | steps per block      | remasking      | temp | top_p | source                   |
|------------|-----------------|----------------------|----------------|------|-------|--------------------------|
| tiny-coder | cfg (32)        | cfg (8)              | low_confidence | 0    | 1     | this repo's training     |
| llada      | 32              | 32 (1 token/step)    | low_confidence | 0    | 1     | LLaDA README chat demo   |
| dream      | whole canvas    | 1 token/step         | entropy        | 0.2  | 0.95  | Dream README             |
| diffullama | whole canvas    | 64                   | random         | 0.9  | 0.9   | inf_diffullama.py        |
| diffugpt   | whole canvas    | 64                   | random         | 0.95 | 0.9   | inf_diffugpt.py          |
| bd3lm      | block_size      | 1 token/step         | random         | 1    | 0.9   | BD3-LM sampling configs  |
| mdlm       | whole canvas    | 1 token/step         | random         | 1    | 1     | MDLM sampling configs    |

"whole canvas" is None here: the block is the whole generation (max_new_tokens). "1 token/step"
is steps_per_block None: as many steps as the block has tokens. Dream's "entropy" is its
`alg="entropy"`; DiffuLLaMA/DiffuGPT's "random keep" and BD3-LM/MDLM's ancestral (first-hitting)
updates unmask positions in random order, which is our "random" rule.

LLaDA's two EOS options (LLaDA paper, Appendix B.4; `generate.py` flags), both off by default:
- `logits_eos_inf`: EOS (126081) is never predicted -> SamplingParams.suppress_token_ids.
- `confidence_eos_eot_inf`: EOS and EoT (126348) are predicted but committed last (their
  confidence is -inf), which stops an instruct model from ending an answer early ->
  `defer_token_ids` below; the sampler must rank them last (see docs/models.md).
Speed presets (confidence_threshold, fewer steps) are the server's choice, not the family's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model.config import ModelConfig


@dataclass(frozen=True)
class FamilyDefaults:
    family: str
    block_length: int | None  # None: the whole generation is one block
    steps_per_block: int | None  # None: one token per step (steps = block length)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float = 1.0
    # Token ids the LM head may never produce (logit -inf), and ids committed only after every
    # other position of the block (confidence -inf): LLaDA's logits_eos_inf / confidence_eos_eot_inf.
    suppress_token_ids: tuple[int, ...] = ()
    defer_token_ids: tuple[int, ...] = ()
    # Options a caller may switch on, by LLaDA's names: option -> (field, ids).
    options: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    source: str = ""

    def with_options(self, **flags: bool) -> FamilyDefaults:
        """Turn on published options by name, e.g. with_options(logits_eos_inf=True)."""
        out = self
        for name, on in flags.items():
            if name not in self.options:
                raise ValueError(f"{self.family} has no option {name!r}; known: {sorted(self.options)}")
            if on:
                fld, ids = self.options[name]
                out = replace(out, **{fld: tuple(dict.fromkeys(getattr(out, fld) + ids))})
        return out

    def sampling_kwargs(self, max_new_tokens: int) -> dict:
        """Keyword arguments for model.sampling.SamplingParams."""
        bl = self.block_length if self.block_length is not None else max_new_tokens
        steps = self.steps_per_block if self.steps_per_block is not None else bl
        return dict(max_new_tokens=max_new_tokens, block_length=bl, steps=min(steps, bl),
                    remasking=self.remasking, temperature=self.temperature, top_p=self.top_p,
                    suppress_token_ids=list(self.suppress_token_ids),
                    defer_token_ids=list(self.defer_token_ids))


def _table(cfg: ModelConfig) -> dict[str, FamilyDefaults]:
    eos, eot = cfg.eos_id, cfg.eot_id
    eos_eot = (eos,) + ((eot,) if eot is not None else ())
    return {
        # EOS/EoT committed last: training pads answers with EOS, so at a block's tail EOS is
        # the most confident prediction and one-commit-per-step rules filled blocks with it from
        # the end (empty answers). Deferred, FIM edit similarity at 8 steps/block rose from
        # 0.077 to 0.164 on 200 held-out cases (benchmarks/results/quality_defer_eos.json).
        "tiny-coder": FamilyDefaults("tiny-coder", cfg.block_length, cfg.default_steps_per_block,
                                     defer_token_ids=eos_eot, source="model/train.py"),
        "llada": FamilyDefaults(
            "llada", 32, None, "low_confidence", 0.0, 1.0,
            options={"logits_eos_inf": ("suppress_token_ids", (eos,)),
                     "confidence_eos_eot_inf": ("defer_token_ids", eos_eot)},
            source="LLaDA README: gen_length=128, steps=128, block_length=32, low_confidence"),
        "dream": FamilyDefaults("dream", None, None, "entropy", 0.2, 0.95,
                                source="Dream README: steps=max_new_tokens, alg=entropy, "
                                       "temperature=0.2, top_p=0.95"),
        "diffullama": FamilyDefaults("diffullama", None, 64, "random", 0.9, 0.9,
                                     source="DiffuLLaMA inf_diffullama.py: diffusion_steps=64, "
                                            "logits_temp=0.9, topp_temp=0.9"),
        "diffugpt": FamilyDefaults("diffugpt", None, 64, "random", 0.95, 0.9,
                                   source="DiffuLLaMA inf_diffugpt.py: diffusion_steps=64, "
                                          "logits_temp=0.95, topp_temp=0.9"),
        "bd3lm": FamilyDefaults("bd3lm", cfg.block_length, None, "random", 1.0, 0.9,
                                source="BD3-LM: first-hitting sampler, nucleus_p=0.9"),
        "mdlm": FamilyDefaults("mdlm", None, None, "random", 1.0, 1.0,
                               source="MDLM: ancestral sampler, one token per step"),
    }


FAMILIES = ("tiny-coder", "llada", "dream", "diffullama", "diffugpt", "bd3lm", "mdlm")


def family_defaults(cfg: ModelConfig) -> FamilyDefaults:
    """Defaults for the family a loader recorded in cfg.extra["family"] (own format: tiny-coder)."""
    family = cfg.extra.get("family", "tiny-coder")
    table = _table(cfg)
    if family not in table:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
    return table[family]
