"""The application's configuration: serve_config.yaml's `args`, validated once.

    a = parse_args({"model": {"source": "tiny-coder"}, "ladder": {"steps": [16, 8, 4, 2]}})
    a.engine          # an engine.EngineConfig (EngineArgs adds the serving-only defaults)
    a.ladder          # a deployments.step_router.Ladder
    a.slo             # a deployments.slo.SloConfig (the latency target)

This is the trust boundary for operators' YAML: every level forbids unknown keys, so a typo
fails the deploy with the path of the bad key instead of being silently ignored. The validated
AppArgs object itself is what build_app binds into every deployment: the ingress, the model
server replicas and their engines read their settings from it, so no field is copied from one
config class into another, and each default is written once. `engine` and `ladder` are the
engine's and the step router's own dataclasses, validated field by field by pydantic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deployments.errors import DEFAULT_RETRY_AFTER_S
from deployments.slo import SloConfig
from deployments.step_router import Ladder
from engine.config import EngineConfig
from model.sampling import FullCacheMode

TensorParallelTransport = Literal["collective", "ray"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelArgs(_Args):
    source: str = "tiny-coder"  # a preset ("tiny-coder") or a checkpoint directory
    id: str | None = None  # the model name clients send; default: the config's name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": cuda when the replica has a GPU, else cpu
    torch_threads: int | None = Field(default=None, ge=1)  # CPU replicas: intra-op threads
    # > 1: each replica reserves this many GPUs (server.num_gpus = 1 per rank) as one placement
    # group and runs one rank actor per extra GPU (deployments/tensor_parallel.py)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # how each forward reaches the other ranks: one broadcast on the TP group per step, with
    # heartbeats while idle ("collective"), or a Ray actor call per step ("ray"), which
    # bench_tp measured at 0.81-0.94x of the broadcast on tiny-coder
    tensor_parallel_transport: TensorParallelTransport = "collective"
    # a collective waiting longer fails: a dead rank breaks the step instead of hanging it
    tensor_parallel_timeout_s: float = Field(default=120.0, gt=0)
    # heal a text prompt's trailing whitespace token (model/healing.py; the ingress strips it):
    # without it many of tiny-coder's answers to prompts ending in "\n" came back empty
    token_healing: bool = True
    # the family's published sampler switches by name (model/families.py), e.g. LLaDA's
    # {logits_eos_inf: true, confidence_eos_eot_inf: true}
    family_options: dict[str, bool] = {}
    # Context extension, as vLLM's overrides: the rotary scaling of a model served past its
    # trained length, e.g. {rope_type: linear, factor: 4} (also dynamic, yarn, llama3; the
    # checkpoint's own rope_scaling otherwise), and the context served (default: the trained
    # one, or trained x factor with a scaling). Past trained x factor the deploy fails.
    rope_scaling: dict[str, Any] | None = None
    max_model_len: int | None = Field(default=None, ge=16)
    # LoRA adapters served beside the base model, as vLLM's --lora-modules: {name: directory of
    # a PEFT adapter}; a request's `model` names one (model/lora.py; slots: engine.max_loras)
    lora_modules: dict[str, str] = {}
    # a PEFT adapter merged into the weights at load: the replica then serves base + adapter
    # at the base model's cost, under the model's own id
    merge_lora: str | None = None

    @field_validator("rope_scaling")
    @classmethod
    def _rope_scaling(cls, v):
        if v is not None:
            from model.rope import normalise_rope_scaling

            normalise_rope_scaling(v, 1)  # the type and its fields, before any load
        return v


@dataclasses.dataclass
class EngineArgs(EngineConfig):
    """engine.EngineConfig (every field, its defaults and their reasons) plus what the ingress
    applies to each request on the engine's behalf."""

    # Full-attention models (LLaDA, Dream): Fast-dLLM's approximate KV cache for every request
    # that does not set its own `full_cache` (model/sampling.py). "none": it changes tokens.
    full_attention_cache: FullCacheMode = "none"

    def __post_init__(self) -> None:
        self.validate()


class LimitsArgs(_Args):
    default_max_tokens: int = Field(default=256, ge=1)  # when a request sets none
    default_temperature: float | None = Field(default=None, ge=0, le=2)  # None: the family's
    max_inflight: int = Field(default=256, ge=1)  # per ingress replica; beyond: 429
    max_drain_s: float | None = Field(default=None, gt=0)  # cluster drain time; beyond: 429
    # Retry-After while the cluster's drain time is not measured yet; once it is, refusals
    # that may fit later say that drain time instead
    retry_after_s: int = Field(default=DEFAULT_RETRY_AFTER_S, ge=1)
    # Request bodies past this are refused (413) before they are read: a 128k-token context of
    # code is ~0.5 MB of text, so 8 MiB leaves room for JSON escapes and long chat histories
    max_request_bytes: int = Field(default=8 << 20, ge=1024)
    # Threads that tokenize prompts off the event loop (the Rust tokenizers release the GIL)
    tokenizer_threads: int = Field(default=2, ge=1, le=64)


class LoRAArgs(_Args):
    """Loading adapters at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter, as
    vLLM's). Off by default; on, only directories under `root` load, and an API key is
    required (auth must be configured): any other path is refused with a 400 before any read."""

    dynamic_loading: bool = False
    root: str | None = None


class AuthArgs(_Args):
    api_keys_env: str | None = "DLLM_API_KEYS"  # comma-separated keys in this env variable
    api_keys_file: str | None = None  # or one key per line in this file


class ServerArgs(_Args):
    """Deployment options of the ModelServer replicas."""

    num_replicas: int | None = Field(default=1, ge=1)
    autoscaling_config: dict[str, Any] | None = None  # replaces num_replicas when set
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    accelerator_type: str | None = None  # e.g. "H100"
    max_ongoing_requests: int = Field(default=64, ge=1)  # streams per replica (engine queues)
    max_queued_requests: int = Field(default=-1, ge=-1)  # in the callers' routers; then 503
    graceful_shutdown_timeout_s: float = Field(default=30, ge=0)
    drain_timeout_s: float = Field(default=30, ge=0)  # engine drain in __del__
    health_check_period_s: float = Field(default=5, gt=0)
    request_router: Literal["least_backlog", "serve_default"] = "least_backlog"
    routing_stats_period_s: float = Field(default=1.0, gt=0)
    # load pushes to the LoadBoard; the step router needs a fresh snapshot at least every second
    report_period_s: float = Field(default=0.25, gt=0, le=1.0)
    # window of the below-best-quality fraction the autoscaling policy reads (quality debt)
    quality_window_s: float = Field(default=30.0, gt=0)
    # requests a replica serves itself, side by side, before it reports ready (0: none): a
    # fresh replica's first passes (allocator growth, oneDNN primitives, Triton compiles) cost
    # many warm ones, and least-backlog routing hands an empty new replica the next requests
    warmup_requests: int = Field(default=2, ge=0, le=64)


class IngressArgs(_Args):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0, ge=0)
    max_ongoing_requests: int = Field(default=1024, ge=1)
    # GET /playground: a page that streams canvases as they denoise (deployments/playground.py);
    # on in the CPU demo config, off by default and in the GPU config
    playground: bool = False


class AppArgs(_Args):
    model: ModelArgs = ModelArgs()
    engine: EngineArgs = EngineArgs()
    ladder: Ladder = Ladder()
    slo: SloConfig = SloConfig()  # the latency target of the step controller (deployments/slo.py)
    limits: LimitsArgs = LimitsArgs()
    auth: AuthArgs = AuthArgs()
    lora: LoRAArgs = LoRAArgs()
    server: ServerArgs = ServerArgs()
    ingress: IngressArgs = IngressArgs()

    @model_validator(mode="after")
    def _tensor_parallel(self):
        if self.model.tensor_parallel_size > 1 and self.server.num_gpus not in (0, 1):
            raise ValueError("with model.tensor_parallel_size > 1, server.num_gpus is per "
                             f"rank and must be 1 (GPU ranks) or 0 (CPU ranks), got "
                             f"{self.server.num_gpus}")
        return self

    @model_validator(mode="after")
    def _lora(self):
        wants = bool(self.model.lora_modules) or self.lora.dynamic_loading
        if wants and self.engine.max_loras < 1:
            raise ValueError("serving LoRA adapters (model.lora_modules, lora.dynamic_loading) "
                             "needs engine.max_loras >= 1 adapter slots")
        if self.lora.dynamic_loading and not self.lora.root:
            raise ValueError("lora.dynamic_loading needs lora.root, the only directory "
                             "adapters may be loaded from")
        if self.model.tensor_parallel_size > 1 and self.model.merge_lora:
            # per-row adapters work under TP (the leader repeats each slot load on every
            # rank); a merge would have to happen on every rank's shard at load
            raise ValueError("model.merge_lora with model.tensor_parallel_size > 1 is not "
                             "supported; serve the adapter per row (lora_modules) instead")
        if self.model.id is not None and self.model.id in self.model.lora_modules:
            raise ValueError(f"adapter name {self.model.id!r} is the base model's id")
        return self


def parse_args(args: dict | AppArgs | None) -> AppArgs:
    """Validate serve_config.yaml's `args`; ValueError naming every bad key's path."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(root)'}: "
                 f"{str(err['msg']).removeprefix('Value error, ')}" for err in e.errors()]
        raise ValueError("invalid dllm application args:\n" + "\n".join(lines)) from None
