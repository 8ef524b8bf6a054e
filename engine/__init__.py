"""Request scheduling on one replica: step-level continuous batching, paged KV cache, streaming.

    from engine import Engine, EngineConfig
    engine = Engine(net, tokenizer, net.cfg, EngineConfig(max_num_seqs=16, kv_cache_bytes=64 << 20))
    async for event in engine.submit(GenerationRequest("r1", prompt_ids, SamplingParams())):
        ...   # TextDelta per finished block, CanvasUpdate per step if diffusing, then Finished

Modules: types.py (the contract with the server), config.py (EngineConfig), engine.py (the
scheduler loop, admission, cancellation, stats), adapters.py (LoRA adapters by name and their
slots), batch.py (the batched forwards of one
iteration), kv_pool.py (the paged KV pool and its attention context), sequence.py (one request's
block state, stop checks and events), detok.py (UTF-8- and stop-string-safe text deltas),
uniform_batch.py / uniform_sequence.py (uniform diffusion, DiffusionGemma: its batched step,
per-layer paged pool and per-sequence self-conditioning state). The
block schedule and its cost are model/schedule.py's, the sampling rules model/rules.py's, shared
with the reference sampler. Knows nothing of Ray or HTTP.
"""

from engine.config import EngineConfig
from engine.engine import Engine, EngineClosedError, QueueFullError
from engine.types import ContextTooLongError

__all__ = ["ContextTooLongError", "Engine", "EngineConfig", "EngineClosedError",
           "QueueFullError"]
