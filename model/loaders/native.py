"""The project's own format (model/checkpoint.py): config.json written by ModelConfig.save,
tokenizer.json of model/tokenizer.py, model.safetensors (or shards) named as our modules.

Recognised by its config.json: no `model_type`, and ModelConfig's own field names. Loaded through
the same streaming path as the published formats, so it gets meta-device building, sharded files
and tensor-parallel slices too; the names map to themselves.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.loaders.common import Target

# Fields every config.json written by ModelConfig.save has, and no HF config does together.
_MARKERS = {"d_model", "n_kv_heads", "mlp_hidden", "logit_shift", "time_conditioning"}


def is_native(hf: dict) -> bool:
    return "model_type" not in hf and _MARKERS <= set(hf)


def map_tensor(key: str, cfg: ModelConfig) -> list[Target] | None:
    return [Target(key)]
