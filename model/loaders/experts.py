"""Stored names of mixture-of-experts weights -> the fused parameters of model/moe.py.

    targets = expert_targets("layers.3.mlp.experts.7.up_proj.weight", cfg)
    # -> [Target("layers.3.mlp.w_gate_up", expert=7, rows=(I, 2I))]

Published MoE checkpoints (LLaDA2.x, LLaDA-MoE, Qwen3-MoE / SDAR-MoE on the hub) store each
expert's gate/up/down projections as separate [I, d] / [d, I] tensors; transformers 5.x saves
them fused ([E, 2I, d] `experts.gate_up_proj`, [E, d, I] `experts.down_proj`). Both fill our
`mlp.w_gate_up` [E, 2I, d] (the I gate rows, then the I up rows) and `mlp.w_down` [E, d, I].
Per-expert tensors are assembled by stream_weights (model/loaders/common.py, Target.expert);
under tensor parallelism a rank reads only its own experts (expert parallel, loaders/tp.py).
"""

from __future__ import annotations

import re

from model.config import ModelConfig
from model.loaders.common import Target

_PER_EXPERT = re.compile(r"^layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^layers\.(\d+)\.(\w+)\.experts\.(gate_up_proj|down_proj)$")


def expert_targets(name: str, cfg: ModelConfig, module: str = "mlp") -> list[Target] | None:
    """Targets of a stored expert tensor (name without the model prefix, experts under
    `module`), or None when `name` is not one."""
    inter = cfg.moe_hidden
    m = _PER_EXPERT.match(name)
    if m and m.group(2) == module:
        i, j, part = int(m.group(1)), int(m.group(3)), m.group(4)
        if part == "down":
            return [Target(f"layers.{i}.mlp.w_down", expert=j)]
        rows = (0, inter) if part == "gate" else (inter, 2 * inter)
        return [Target(f"layers.{i}.mlp.w_gate_up", expert=j, rows=rows)]
    m = _FUSED.match(name)
    if m and m.group(2) == module:
        i = int(m.group(1))
        leaf = "w_gate_up" if m.group(3) == "gate_up_proj" else "w_down"
        return [Target(f"layers.{i}.mlp.{leaf}")]
    return None
