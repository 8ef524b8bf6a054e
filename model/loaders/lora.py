"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) in our module names.

    adapter = read_adapter("adapters/my-repo", base="ckpt/DiffuLLaMA", cfg=cfg, name="my-repo")
    adapter.lora["layers.0.attn.wq"]     # LoRAModule(a [r, in], b [out, r], scale)
    adapter.replace["lm_head.weight"]    # modules_to_save: whole tensors, in our names
    write_adapter(out_dir, adapter, target_modules=["wq", "wv"])   # ours, PEFT layout

An adapter names the modules of the model it was trained on: transformers' (`base_model.model.
model.layers.3.self_attn.q_proj.lora_A.weight`) for a published checkpoint, ours
(`base_model.model.layers.3.attn.wq.lora_A.weight`) for tiny-coder and the adapters
`dllm train --lora` writes. Each module's weight name goes through the base checkpoint's own
format map (model/loaders/*.py, the same `map_tensor` the base weights went through), so a LoRA
maps onto exactly the Linear its base weight filled, for every family:

- one target (q_proj -> attn.wq; GPT-2's Conv1D c_fc -> mlp.fc, whose stored weight is transposed):
  A [r, in] and B [out, r] as stored; PEFT keeps A/B in nn.Linear orientation even for Conv1D
  (fan_in_fan_out only transposes the base weight when merging).
- several targets (a fused tensor split by the loader, GPT-2's c_attn -> wq/wk/wv, BD3-LM's
  attn_qkv): the targets share A, and B [n*out, r] is cut into n equal row blocks in target order,
  as the loader cuts the fused weight's output features.

Scale per module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (rsLoRA); alpha_pattern
overrides alpha by module-name pattern, and r is the stored A's rows (rank_pattern only says the
same). Tensors stay full (not cut for tensor parallelism) and float32 on the CPU; model/lora.py
slices each rank's part when it puts an adapter in a slot. Refused with a FormatError, never
silently mis-applied: DoRA, LoRA biases, LoRA on embeddings, pickle-only weights, names the base
format does not know.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import CONFIG_FILE, ModelConfig
from model.loaders.common import FormatError, MapTensor, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAModule:
    """One Linear's low-rank update: delta W = scale * b @ a (a [r, in], b [out, r], full size)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class AdapterWeights:
    name: str
    path: Path | None
    lora: dict[str, LoRAModule]  # our Linear module name ("layers.0.attn.wq") -> its update
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # our param name -> tensor
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.lora.values()), default=0)

    def nbytes(self) -> int:
        return sum(m.a.numel() * 4 + m.b.numel() * 4 for m in self.lora.values()) + \
            sum(t.numel() * t.element_size() for t in self.replace.values())


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_map(base: str | Path) -> MapTensor:
    """The format map of the base checkpoint `base` (a directory or "tiny-coder")."""
    from model.loaders import detect_format, native, resolve_path

    directory = resolve_path(base)
    fmt = detect_format(read_json(directory / CONFIG_FILE))
    return native.map_tensor if fmt is None else fmt.map_tensor


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha patterns: a key matches a module name it ends (at a dot) or matches."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def read_adapter_config(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    try:
        conf = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise FormatError(f"{path} is not a JSON object")
    kind = str(conf.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise FormatError(f"peft_type {conf.get('peft_type')!r}: only LoRA adapters are supported")
    if conf.get("use_dora"):
        raise FormatError("DoRA adapters (use_dora) are not supported")
    if conf.get("bias", "none") != "none" or conf.get("lora_bias"):
        raise FormatError(f"LoRA biases (bias={conf.get('bias')!r}, lora_bias) are not supported")
    if not isinstance(conf.get("r", 8), int) or conf.get("r", 8) < 1:
        raise FormatError(f"r must be a positive integer, got {conf.get('r')!r}")
    return conf


def read_adapter(directory: str | Path, *, base: str | Path | None = None,
                 map_tensor: MapTensor | None = None, cfg: ModelConfig,
                 name: str | None = None) -> AdapterWeights:
    """The adapter in `directory`, its module names mapped through the base checkpoint's format
    (`base`: the model directory, or `map_tensor` given directly). cfg: the served model's full
    (unsharded) config. Raises FileNotFoundError / FormatError."""
    directory = Path(directory)
    conf = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if list(directory.glob("adapter_model.bin")):
            raise FormatError(f"{directory} holds adapter_model.bin only; pickle files can run "
                              "code when loaded, so convert it to safetensors first")
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    if map_tensor is None:
        if base is None:
            raise ValueError("read_adapter needs the base checkpoint (base=) or its map_tensor")
        map_tensor = base_map(base)
    alpha = float(conf.get("lora_alpha", conf.get("r", 8)))
    rslora = bool(conf.get("use_rslora", False))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as sf:
        for key in sf.keys():
            name_ = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_embedding_" in name_ or ".lora_magnitude_vector" in name_:
                raise FormatError(f"{key}: LoRA on embeddings / DoRA magnitudes are not supported")
            m = _LORA_KEY.match(name_)
            if m:
                halves.setdefault(m.group("mod"), {})[m.group("ab")] = sf.get_tensor(key).float()
                continue
            # modules_to_save: a whole replacement tensor ("lm_head.weight"); PEFT may keep
            # its wrapper's path in the name
            name_ = name_.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
            targets = map_tensor(name_, cfg)
            if not targets:
                raise FormatError(f"{key}: {name_!r} is not a tensor of the base model")
            for tgt in targets:
                t = sf.get_tensor(key)
                t = tgt.transform(t.float()) if tgt.transform is not None else t
                replace[tgt.name] = t.contiguous()
    lora: dict[str, LoRAModule] = {}
    for mod, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise FormatError(f"{mod}: the adapter has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise FormatError(f"{mod}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                              "do not chain")
        r = int(a.shape[0])
        mod_alpha = float(_pattern_value(conf.get("alpha_pattern"), mod, alpha))
        scale = mod_alpha / (math.sqrt(r) if rslora else r)
        targets = map_tensor(f"{mod}.weight", cfg)
        if not targets:
            raise FormatError(f"{mod}: not a module of the base model (its weight "
                              f"{mod}.weight has no place in the network)")
        if any(not t.name.endswith(".weight") for t in targets):
            raise FormatError(f"{mod}: maps to {[t.name for t in targets]}, not Linear weights")
        n = len(targets)
        if b.shape[0] % n:
            raise FormatError(f"{mod}: lora_B rows {b.shape[0]} do not split over {n} modules")
        rows = b.shape[0] // n
        for i, tgt in enumerate(targets):
            ours = tgt.name[: -len(".weight")]
            lora[ours] = LoRAModule(a.contiguous(), b[i * rows:(i + 1) * rows].contiguous(), scale)
    if not lora and not replace:
        raise FormatError(f"{weights} holds no LoRA tensors")
    return AdapterWeights(name=name or directory.resolve().name, path=directory, lora=lora,
                          replace=replace, config=conf)


def write_adapter(directory: str | Path, adapter: AdapterWeights, *, alpha: float,
                  use_rslora: bool = False, base_model: str | None = None) -> Path:
    """Save an adapter in our module names in the PEFT layout (what read_adapter and peft read
    back); B is stored unscaled, so alpha and use_rslora must be those it was trained with."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for mod, m in sorted(adapter.lora.items()):
        tensors[f"{_PEFT_PREFIX}{mod}.lora_A.weight"] = m.a.detach().float().contiguous()
        tensors[f"{_PEFT_PREFIX}{mod}.lora_B.weight"] = m.b.detach().float().contiguous()
    for pname, t in sorted(adapter.replace.items()):
        tensors[f"{_PEFT_PREFIX}{pname}"] = t.detach().contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    leaves = sorted({mod.rsplit(".", 1)[-1] for mod in adapter.lora})
    conf = {"peft_type": "LORA", "r": adapter.rank, "lora_alpha": alpha,
            "use_rslora": use_rslora, "target_modules": leaves, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "modules_to_save": sorted({p.rsplit(".", 1)[0] for p in adapter.replace}) or None,
            "base_model_name_or_path": base_model, "rank_pattern": {}, "alpha_pattern": {},
            "task_type": None, "inference_mode": True}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return directory
