"""From an OpenAI request to engine requests: tokenize, check the context, heal, pick the steps.

    jobs = JobBuilder(info, tokenizer, args)
    job = jobs.chat(req, choice)         # or jobs.completion(req, choice)
    job.requests                         # one GenerationRequest per prompt x n

FIM: block-causal models (tiny-coder) take it in the prompt (Tokenizer.fim_prompt); full-attention
models get the suffix after the canvas (GenerationRequest.suffix_ids).

Token healing: a text prompt ending in a whitespace token is backed off by that token and the
first generated token must start with it (model/healing.py); `Job.healed` holds the text the
ingress strips from the answer again, since the client's prompt already has it. Off for
requests with stop strings (the healed text could match them).

Every refusal here is an APIError raised before any engine work: 400 for bad parameters, 413
when the prompt (plus max_tokens) does not fit the model's context (max_model_len), or, for a
full-attention model without the prefix/dual cache, is longer than
engine.max_uncached_full_attention_tokens.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field

from deployments.config import AppArgs
from deployments.errors import APIError
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FIMCompletionRequest,
    GenerationRequestBase,
)
from deployments.slo import RequestShape
from deployments.step_router import StepChoice
from engine.types import GenerationRequest, ModelInfo
from model.healing import heal_prompt
from model.schedule import request_token_steps

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One prompt of a request, tokenized."""

    ids: list[int]
    suffix_ids: list[int] | None = None  # FIM for full-attention models
    echo: str = ""  # text to prepend to the completion (echo=true)
    healable: bool = False  # a plain text prompt: its last token may be healed


@dataclass
class Job:
    """One HTTP request turned into engine requests (prompts x n)."""

    id: str
    requests: list[GenerationRequest]
    choice: StepChoice
    steps_per_block: int
    prompt_tokens: int
    echo: list[str] = field(default_factory=list)  # per request: text to prepend (echo)
    healed: list[str] = field(default_factory=list)  # per request: prompt text regenerated
    quality: str = "auto"
    own_threshold: bool = False  # the request set confidence_threshold: rungs do not change it
    route: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    @property
    def quality_note(self) -> dict:
        """For the replicas' below_best_fraction: only load-driven choices count."""
        if self.choice.reason != "load":
            return {"below_best": None}
        return {"below_best": bool(self.choice.rung)}

    def apply_choice(self, choice: StepChoice) -> None:
        """Give every engine request the router's setting (steps per block and, unless the
        request set its own, the rung's confidence threshold)."""
        self.choice = choice
        for r in self.requests:
            r.params.steps = choice.steps
            if not self.own_threshold:
                r.params.confidence_threshold = choice.confidence_threshold
            r.params.validate()
            self.steps_per_block = min(choice.steps, r.params.block_length)

    def shape(self, info: ModelInfo) -> RequestShape:
        """What the step controller predicts this job's latency from (its longest choice)."""
        r = max(self.requests, key=lambda r: (r.params.max_new_tokens, len(r.prompt_ids)))
        return RequestShape(prompt_tokens=len(r.prompt_ids) + len(r.suffix_ids or []),
                            max_new_tokens=r.params.max_new_tokens,
                            block_length=r.params.block_length,
                            block_causal=info.attention == "block_causal", n=len(self.requests))

    def scheduled_passes(self) -> int:
        """Denoising passes of the longest choice if nothing stops early (for calibration)."""
        return max(r.params.schedule.total_steps for r in self.requests)

    def token_steps(self, info: ModelInfo) -> int:
        """The work this job adds to the cluster, as the engine counts it (model/schedule.py)."""
        return sum(request_token_steps(
            len(r.prompt_ids) + len(r.suffix_ids or []), r.params.max_new_tokens,
            r.params.steps, r.params.block_length, info.attention == "block_causal",
            r.params.full_cache, len(r.suffix_ids or []), info.logit_shift,
            info.block_align)
            for r in self.requests)


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes one token decodes to (a token that is part of a
    character decodes to U+FFFD, 3 bytes: more than it holds, so still a bound)."""
    return max((len(tokenizer.decode([i]).encode("utf-8", "replace"))
                for i in range(tokenizer.vocab_size)), default=1) or 1


class JobBuilder:
    def __init__(self, info: ModelInfo, tokenizer, args: AppArgs):
        self.info, self.tokenizer, self.args = info, tokenizer, args
        # A text of more characters than this has more UTF-8 bytes, so more tokens, than the
        # context holds: it is refused without tokenizing it.
        self.max_prompt_chars = info.max_seq_len * max_token_bytes(tokenizer)

    def check_text_size(self, texts: list[str], param: str) -> None:
        chars = sum(len(t) for t in texts)
        if chars > self.max_prompt_chars:
            raise APIError(413, f"the {param} is {chars} characters; this model's context of "
                           f"{self.info.max_seq_len} tokens holds at most "
                           f"{self.max_prompt_chars} characters of this tokenizer's text",
                           param=param, code="context_length_exceeded")

    # --- per request type -------------------------------------------------------------------
    def chat(self, req: ChatCompletionRequest, choice: StepChoice) -> Job:
        messages = []
        for m in req.messages:
            if m.role == "tool":
                raise APIError(400, "tool messages are not supported", param="messages")
            try:
                text = m.text()
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            messages.append({"role": "system" if m.role == "developer" else m.role,
                             "content": text})
        self.check_text_size([m["content"] for m in messages], "messages")
        try:
            ids = self.tokenizer.chat_prompt(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self._job("chatcmpl", req, choice, [Prompt(ids)])

    def completion(self, req: CompletionRequest | FIMCompletionRequest,
                   choice: StepChoice) -> Job:
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list = [prompt]
        elif isinstance(prompt[0], int):
            texts = [list(prompt)]
        else:
            texts = list(prompt)
        for t in texts:  # each prompt is its own sequence
            if isinstance(t, str):
                self.check_text_size([t, req.suffix or ""], "prompt")
        echo = isinstance(req, CompletionRequest) and req.echo
        return self._job("cmpl", req, choice, [self._prompt(p, req.suffix, echo) for p in texts])

    def _prompt(self, p: str | list[int], suffix: str | None, echo: bool) -> Prompt:
        if suffix:  # fill-in-the-middle
            if not isinstance(p, str):
                raise APIError(400, "suffix needs a text prompt", param="suffix")
            ids, suffix_ids = self.fim_ids(p, suffix)
            return Prompt(ids, suffix_ids, p if echo else "")
        if isinstance(p, str):
            return Prompt(self.tokenizer.encode(p), None, p if echo else "", healable=True)
        if any(not isinstance(t, int) or not 0 <= t < self.tokenizer.vocab_size for t in p):
            raise APIError(400, "prompt token ids out of range", param="prompt")
        return Prompt(list(p), echo=self.tokenizer.decode(list(p)) if echo else "")

    def fim_ids(self, prefix: str, suffix: str) -> tuple[list[int], list[int] | None]:
        """Block-causal models: FIM format in the prompt; full attention: suffix after canvas;
        uniform-diffusion models (DiffusionGemma, not trained for it): refused."""
        if self.info.process == "uniform":
            raise APIError(400, f"the {self.info.family} family does not support "
                                "fill-in-the-middle (suffix)", param="suffix")
        if self.info.attention == "block_causal":
            try:
                return self.tokenizer.fim_prompt(prefix, suffix), None
            except ValueError as e:  # a tokenizer without FIM tokens
                raise APIError(400, str(e), param="suffix") from None
        return self.tokenizer.encode(prefix), self.tokenizer.encode(suffix)

    # --- shared -----------------------------------------------------------------------------
    def _job(self, prefix: str, req: GenerationRequestBase, choice: StepChoice,
             prompts: list[Prompt]) -> Job:
        """n choices of each prompt."""
        base_seed = req.seed if req.seed is not None else random.getrandbits(31)
        job = Job(id=f"{prefix}-{uuid.uuid4().hex[:24]}", requests=[], choice=choice,
                  steps_per_block=choice.steps, prompt_tokens=0, quality=req.quality,
                  # a threshold the request or the family's own sampler sets (Fast-dLLM v2's
                  # sub-block threshold) is not the step router's to change
                  own_threshold=req.confidence_threshold is not None
                  or self.info.family_params.get("confidence_threshold") is not None)
        for prompt in prompts:
            ids, suffix_ids = prompt.ids, prompt.suffix_ids
            max_new = self._max_new_tokens(req.max_new_tokens, len(ids) + len(suffix_ids or []))
            job.steps_per_block = min(choice.steps, req.block_length_for(self.info, max_new))
            job.prompt_tokens += len(ids) + len(suffix_ids or [])
            healed, first_ids = "", None
            if prompt.healable:
                ids, healed, first_ids = self._heal(req, ids)
            for _ in range(req.n):
                k = len(job.requests)
                params = self._params(req, max_new, choice.steps, (base_seed + k) % 2**31)
                params.first_token_ids = first_ids
                self._check_uncached_full_row(len(ids) + max_new + len(suffix_ids or []),
                                              params.full_cache)
                job.requests.append(GenerationRequest(
                    request_id=f"{job.id}-{k}", prompt_ids=list(ids), params=params,
                    suffix_ids=suffix_ids, diffusing=req.diffusing))
                job.echo.append(prompt.echo)
                job.healed.append(healed)
        return job

    def _params(self, req: GenerationRequestBase, max_new: int, steps: int, seed: int):
        try:
            return req.to_sampling_params(
                self.info, max_new_tokens=max_new, steps=steps, seed=seed,
                default_temperature=self.args.limits.default_temperature,
                default_full_cache=self.args.engine.full_attention_cache)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _check_uncached_full_row(self, row_tokens: int, full_cache: str) -> None:
        """Full-attention rows run whole at every step unless they use the prefix/dual cache:
        past engine.max_uncached_full_attention_tokens they are refused (413, the limit named)."""
        limit = self.args.engine.max_uncached_full_attention_tokens
        if self.info.attention != "full" or full_cache != "none" or limit is None:
            return
        if row_tokens > limit:
            raise APIError(413, f"the prompt plus max_tokens is {row_tokens} tokens; this server "
                           f"runs full-attention rows of more than {limit} tokens only with the "
                           "prefix or dual cache: set full_cache to 'prefix' or 'dual'",
                           param="prompt", code="context_length_exceeded")

    def _max_new_tokens(self, requested: int | None, used: int) -> int:
        ctx = self.info.max_seq_len
        if used >= ctx:
            raise APIError(413, f"the prompt is {used} tokens; this model's context is {ctx}",
                           param="prompt", code="context_length_exceeded")
        if requested is None:
            return min(self.args.limits.default_max_tokens, ctx - used)
        if requested > ctx:
            raise APIError(400, f"max_tokens ({requested}) exceeds the model's context ({ctx})",
                           param="max_tokens", code="invalid_value")
        if used + requested > ctx:
            raise APIError(413, f"the prompt ({used} tokens) plus max_tokens ({requested}) "
                           f"exceeds the model's context ({ctx})", param="prompt",
                           code="context_length_exceeded")
        return requested

    def _heal(self, req: GenerationRequestBase, ids: list[int]
              ) -> tuple[list[int], str, list[int] | None]:
        if not self.args.model.token_healing or req.stop_list:
            return ids, "", None
        if self.info.process == "uniform":  # no first-token constraint in uniform diffusion
            return ids, "", None
        try:
            return heal_prompt(self.tokenizer, ids)
        except Exception as e:  # a tokenizer without what healing needs: serve unhealed
            log.debug("token healing skipped: %s", e)
            return ids, "", None
