"""One engine's LoRA adapters: held by name, put into the network's slots as requests need them.

    adapters = EngineAdapters(net, EngineConfig(max_loras=4, max_lora_rank=16))
    adapters.add(weights)              # hold it; a slot is filled when a request first names it
    adapters.reader = read             # (name, directory) -> AdapterWeights, for `read`
    adapters.acquire(seq)              # admission: pin a slot with seq's adapter (False: none free)
    adapters.release(seq)              # the row is done: unpin (and evict a removed adapter)

The slots (model/lora.py's LoRABank) hook the network's Linears once, at construction, so every
row of a batch may use a different adapter (or none). A tensor-parallel leader puts the slots
on rank 0's shard and repeats every load on the other ranks. An adapter removed while running
rows still hold its slot is retired: it leaves the slot when the last of them releases it.
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.sequence import Sequence
from model.loaders.lora import AdapterWeights
from model.lora import LoRABank, apply_lora, find_bank


class UnknownAdapterError(ValueError):
    """A request names an adapter this engine does not hold (the server answers 404)."""


class EngineAdapters:
    def __init__(self, net: torch.nn.Module, config: EngineConfig):
        self.bank: LoRABank | None = find_bank(net)
        if self.bank is None and config.max_loras:
            S, R = config.max_loras, config.max_lora_rank
            if _is_tp_leader(net):  # slots on rank 0's shard; every load repeated on the others
                self.bank = apply_lora(net.net, S, R)
                self.bank.on_load.append(lambda slot, a: net.lora_load(slot, a, S, R))
            else:
                self.bank = apply_lora(net, S, R)
        self.held: dict[str, AdapterWeights] = {}
        # (name, directory) -> AdapterWeights: model/loaders/lora.read_adapter against the base
        # checkpoint's format, set by whoever loaded the model
        self.reader = None
        self._retired: set[str] = set()  # removed while running rows held them

    def _require_bank(self) -> LoRABank:
        if self.bank is None:
            raise ValueError("this engine serves no adapters (EngineConfig.max_loras = 0)")
        return self.bank

    def check_request(self, name: str | None) -> None:
        """UnknownAdapterError unless `name` is None or held."""
        if name is not None and name not in self.held:
            raise UnknownAdapterError(f"this engine holds no adapter {name!r}"
                                      + ("" if self.bank is not None else
                                         " (it serves no adapters: EngineConfig.max_loras = 0)"))

    def add(self, adapter: AdapterWeights) -> None:
        """Hold `adapter` under adapter.name. Raises AdapterError if it cannot fit the slots
        (rank, modules), ValueError if the engine serves no adapters or the name is still held
        by running requests after a removal."""
        bank = self._require_bank()
        bank.check(adapter)
        if adapter.name in self._retired or (adapter.name in self.held
                                             and not bank.evict(adapter.name)):
            raise ValueError(f"adapter {adapter.name!r} is in use by running requests")
        bank.evict(adapter.name)  # a new version of a name: the old slot is stale
        self.held[adapter.name] = adapter

    def read(self, name: str, path: str) -> AdapterWeights:
        """The PEFT adapter in directory `path`, through `reader` (blocking file reads)."""
        if self.reader is None:
            raise ValueError("this engine cannot read adapters (no adapter_reader)")
        self._require_bank()
        return self.reader(name, path)

    def remove(self, name: str) -> bool:
        """Forget adapter `name` (requests already admitted finish with it). -> whether it
        was held."""
        if self.held.pop(name, None) is None:
            return False
        if self.bank is not None and not self.bank.evict(name):
            self._retired.add(name)  # evicted when its last row releases it
        return True

    def names(self) -> list[str]:
        return sorted(self.held)

    def resident(self) -> list[str]:
        return self.bank.resident() if self.bank is not None else []

    def acquire(self, seq: Sequence) -> bool:
        """Pin a slot holding seq's adapter. False: every slot is held by running rows."""
        if seq.adapter is None:
            return True
        adapter = self.held.get(seq.adapter)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {seq.adapter!r} was removed")
        slot = self.bank.acquire(adapter)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def release(self, seq: Sequence) -> None:
        if seq.lora_slot < 0:
            return
        self.bank.release(seq.lora_slot)
        seq.lora_slot = -1
        if seq.adapter in self._retired and self.bank.evict(seq.adapter):
            self._retired.discard(seq.adapter)

    def stats(self) -> dict | None:
        if self.bank is None:
            return None
        return {"adapters": len(self.held), "resident": self.bank.resident(),
                "loads": self.bank.loads, "evictions": self.bank.evictions}


def _is_tp_leader(net: torch.nn.Module) -> bool:
    from engine.tensor_parallel import TPLeader

    return isinstance(net, TPLeader)
