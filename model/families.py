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
| llada2     | 32 (aligned)    | 32, threshold 0.95*  | low_confidence | 0    | 1     | LLaDA2 generate()        |
| llada_moe  | 32              | 1 token/step         | low_confidence | 0    | 1     | LLaDA-MoE README         |
| sdar       | block_size (4)  | block_size, thr 0.85*| low_confidence | 1    | 1     | SDAR generate.py         |
| diffusion_gemma | canvas (256) | 48 (a cap)**        | entropy_bound  | 0.8->0.4 | 1 | generation_config.json   |
| fast_dllm_v2 | 32 (aligned)  | sub-blocks of 8, thr 0.9 | low_confidence | 0 | 0.95 | Fast-dLLM v2 generate() |

* threshold_floor "schedule": a step commits the larger of (predictions above the threshold,
its scheduled count), LLaDA2's rule and SDAR's low_confidence_dynamic; positions are scored on
the distribution the token is drawn from (scoring "drawn"). LLaDA2's published generate samples
at T = 1 when asked for temperature 0 (a bug); here temperature 0 is argmax. SDAR's generate.py
default is temperature 1.0 (it divides by T: no T = 0 there); 0 here is argmax. "aligned":
blocks aligned to position 0 (ModelConfig.block_align "zero", set by the loaders).
LLaDA2.2's token editing (delete / split tokens) is refused (`refused` below) and its editing
ids are never generated.
** uniform (renoising) diffusion: steps are max_denoising_steps per canvas, adaptive stopping may
end a canvas earlier; its temperature falls linearly from t_max to t_min over the steps.

"whole canvas" is None here: the block is the whole generation (max_new_tokens). "1 token/step"
is steps_per_block None: as many steps as the block has tokens. Dream's "entropy" is its
`alg="entropy"`; DiffuLLaMA/DiffuGPT's "random keep" and BD3-LM/MDLM's ancestral (first-hitting)
updates unmask positions in random order, which is our "random" rule.

LLaDA's two EOS options (LLaDA paper, Appendix B.4; `generate.py` flags), both off by default:
- `logits_eos_inf`: EOS (126081) is never predicted -> SamplingParams.suppress_token_ids.
- `confidence_eos_eot_inf`: EOS and EoT (126348) may be predicted, but their logits are -inf
  in the softmax that scores positions, so such a position scores 0 and every other confidence
  is renormalised without them, exactly as generate.py does it (at temperature 0; at T > 0 its
  chained assignment lands on a copy for EOS, so only EoT is removed there -- we remove both)
  -> SamplingParams.confidence_inf_token_ids. `defer_eos_eot` keeps this project's earlier
  approximation (ranked last, confidences untouched) -> defer_token_ids.
Dream's default reproduces its diffusion_generate: Dream's time schedule (step_schedule
"dream") and scores on the tempered top-p nucleus (scoring "nucleus"); the project's earlier
even split and raw scores stay available per request (step_schedule "even", scoring "raw").
Speed presets (confidence_threshold, fewer steps) are the server's choice, not the family's,
except where the threshold is the authors' sampler itself (Fast-dLLM v2's sub-blocks).
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
    # The authors' sampler exactly (model/sampling.py SamplingParams fields of the same names):
    # commits per step ("even" | "dream"), the distribution positions are scored on ("raw" |
    # "nucleus" | "drawn"), LLaDA's exact confidence_eos_eot_inf ids, Fast-dLLM v2's sub-blocks
    # and its confidence threshold (a sampler parameter there, not a speed preset).
    step_schedule: str = "even"
    scoring: str = "raw"
    confidence_inf_token_ids: tuple[int, ...] = ()
    sub_block_length: int | None = None
    confidence_threshold: float | None = None
    ar_block_start: bool = False  # Fast-dLLM v2: each block opens with one autoregressive token
    stop_in_block: bool = False  # Fast-dLLM v2: a block is left once a stop token ends the answer
    # Whether the authors' sampler has classifier-free guidance (LLaDA's generate cfg_scale):
    # the family was trained with the prompt dropped, so a prompt-masked row is meaningful.
    classifier_free_guidance: bool = False
    # With confidence_threshold: commit at least one ("one") or at least the step's scheduled
    # count ("schedule": LLaDA2.x, SDAR); SamplingParams.threshold_floor.
    threshold_floor: str = "one"
    # Published options this server does not reproduce: option -> why (with_options refuses them)
    refused: dict[str, str] = field(default_factory=dict)
    # The diffusion process: "masked" (absorbing: a mask token is replaced and stays) or
    # "uniform" (renoising, DiffusionGemma: model/uniform.py; the engine runs it through
    # engine/uniform_batch.py). Uniform families have no mask token and no fill-in-the-middle.
    process: str = "masked"

    def with_options(self, **flags: bool) -> FamilyDefaults:
        """Turn on published options by name, e.g. with_options(logits_eos_inf=True)."""
        out = self
        for name, on in flags.items():
            if on and name in self.refused:
                raise ValueError(f"{self.family}: {name} is not supported: {self.refused[name]}")
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
                    defer_token_ids=list(self.defer_token_ids), **self.exact_sampler_kwargs())

    def exact_sampler_kwargs(self) -> dict:
        """The SamplingParams fields of the authors' exact sampler where they differ from
        SamplingParams' defaults (an empty dict for families the defaults already reproduce)."""
        out = dict(step_schedule=self.step_schedule, scoring=self.scoring,
                   confidence_inf_token_ids=list(self.confidence_inf_token_ids),
                   sub_block_length=self.sub_block_length,
                   confidence_threshold=self.confidence_threshold,
                   threshold_floor=self.threshold_floor, ar_block_start=self.ar_block_start,
                   stop_in_block=self.stop_in_block)
        default = dict(step_schedule="even", scoring="raw", confidence_inf_token_ids=[],
                       sub_block_length=None, confidence_threshold=None, threshold_floor="one",
                       ar_block_start=False, stop_in_block=False)
        return {k: v for k, v in out.items() if v != default[k]}


def _table(cfg: ModelConfig) -> dict[str, FamilyDefaults]:
    eos, eot = cfg.eos_id, cfg.eot_id
    eos_eot = (eos,) + ((eot,) if eot is not None else ())
    return {
        # EOS/EoT committed last: training pads answers with EOS, so at a block's tail EOS is
        # the most confident prediction and one-commit-per-step rules filled blocks with it from
        # the end (empty answers). Deferred, FIM edit similarity at 8 steps/block rose from
        # 0.077 to 0.164 on 200 held-out cases for v1's weights; v2's at 32 steps: 0.011 -> 0.263
        # (benchmarks/results/quality.json, quality_defer_eos.json).
        "tiny-coder": FamilyDefaults("tiny-coder", cfg.block_length, cfg.default_steps_per_block,
                                     defer_token_ids=eos_eot, source="model/train.py"),
        "llada": FamilyDefaults(
            "llada", 32, None, "low_confidence", 0.0, 1.0,
            options={"logits_eos_inf": ("suppress_token_ids", (eos,)),
                     "confidence_eos_eot_inf": ("confidence_inf_token_ids", eos_eot),
                     # this project's earlier approximation of it: EOS/EoT ranked last, the
                     # other confidences not renormalised
                     "defer_eos_eot": ("defer_token_ids", eos_eot)},
            source="LLaDA README: gen_length=128, steps=128, block_length=32, low_confidence",
            classifier_free_guidance=True),
        # Dream's diffusion_generate exactly: its linspace time schedule and scores on the
        # tempered top-p nucleus (tests/model/test_dream_exact.py pins it token for token)
        "dream": FamilyDefaults("dream", None, None, "entropy", 0.2, 0.95,
                                step_schedule="dream", scoring="nucleus",
                                source="Dream README: steps=max_new_tokens, alg=entropy, "
                                       "temperature=0.2, top_p=0.95; generation_utils.py"),
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
        # LLaDA2.x generate(block_length=32, steps=32, threshold=0.95, temperature=0.0): at each
        # step the larger of (above 0.95, the even split of 32 over 32 steps); blocks aligned
        # to position 0 by the loader (cfg.block_align). Editing ids of 2.2 are never produced.
        "llada2": FamilyDefaults(
            "llada2", 32, 32, "low_confidence", 0.0, 1.0,
            suppress_token_ids=tuple(cfg.extra.get("token_editing", {}).values()),
            confidence_threshold=0.95, threshold_floor="schedule", scoring="drawn",
            refused={"token_editing": "LLaDA2.2's delete/split token editing is out of scope; "
                                      "this server decodes masks only"},
            source="LLaDA2 modeling generate(): block_length=32, steps=32, threshold=0.95"),
        # LLaDA-MoE-7B-A1B README: LLaDA's generate(steps=128, gen_length=128, block_length=32,
        # temperature=0, remasking="low_confidence"): one token per step
        "llada_moe": FamilyDefaults(
            "llada_moe", 32, None, "low_confidence", 0.0, 1.0,
            source="LLaDA-MoE README: gen_length=128, steps=128, block_length=32, low_confidence"),
        # SDAR generate.py: block_length = the checkpoint's block_size, denoising_steps = it,
        # remasking low_confidence_dynamic at 0.85, temperature 1.0, top_k 0, top_p 1.0
        "sdar": FamilyDefaults(
            "sdar", cfg.block_length, None, "low_confidence", 1.0, 1.0,
            confidence_threshold=0.85, threshold_floor="schedule", scoring="drawn",
            source="SDAR generate.py: low_confidence_dynamic, confidence_threshold=0.85, "
                   "temperature=1.0"),
        # Fast-dLLM v2 (NVlabs) run_chatbot.py: generate(block_size=32, small_block_size=8,
        # threshold=0.9), temperature 0 and top_p 0.95 by generate's defaults. Within the first
        # sub-block that has masks, every prediction above 0.9 is committed, at least the most
        # confident (steps only cap it: at most one per token); each block opens with an
        # autoregressive token; scores on the drawn distribution (raw at T = 0); a block is
        # left once a committed stop token has nothing masked before it.
        "fast_dllm_v2": FamilyDefaults(
            "fast_dllm_v2", cfg.block_length, None, "low_confidence", 0.0, 0.95,
            confidence_threshold=0.9, sub_block_length=8, scoring="drawn", ar_block_start=True,
            stop_in_block=True,
            source="Fast-dLLM v2 run_chatbot.py / modeling.py generate(): block_size=32, "
                   "small_block_size=8, threshold=0.9, top_p=0.95, temperature=0"),
        # DiffusionGemma (transformers 5.x generate): uniform diffusion over canvases of
        # canvas_length (the block), max_denoising_steps per canvas (the "steps"), entropy-bound
        # acceptance; t_min/t_max, the bound and the stopping thresholds come from the
        # checkpoint's generation_config.json (cfg.extra["uniform_defaults"], model/uniform.py)
        "diffusion_gemma": FamilyDefaults(
            "diffusion_gemma", cfg.block_length,
            int(cfg.extra.get("uniform_defaults", {}).get("max_denoising_steps", 48)),
            "entropy_bound", 0.0, 1.0, process="uniform",
            source="transformers DiffusionGemmaGenerationConfig / generation_config.json: "
                   "max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8"),
    }


FAMILIES = ("tiny-coder", "llada", "dream", "diffullama", "diffugpt", "bd3lm", "mdlm", "llada2",
            "llada_moe", "sdar", "fast_dllm_v2", "diffusion_gemma")


def family_defaults(cfg: ModelConfig) -> FamilyDefaults:
    """Defaults for the family a loader recorded in cfg.extra["family"] (own format: tiny-coder)."""
    family = cfg.extra.get("family", "tiny-coder")
    table = _table(cfg)
    if family not in table:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
    return table[family]
