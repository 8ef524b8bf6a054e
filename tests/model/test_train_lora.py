"""`dllm train --lora` (model/train_lora.py): step 0 is the base model, training moves only the
adapter, a run stopped and resumed ends where an uninterrupted one does, and what it writes is
an adapter the server loads (model/loaders/lora.read_adapter) that changes the logits."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import save_checkpoint
from model.data import stdlib_dir
from model.loaders import load_pretrained
from model.loaders.lora import read_adapter
from model.lora import apply_lora
from model.train_lora import add_args, split_held_out, train_lora
from model.transformer import DiffusionTransformer
from tests.model.conftest import tiny_config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, small_tokenizer):
    d = tmp_path_factory.mktemp("lora_base")
    torch.manual_seed(0)
    save_checkpoint(d, DiffusionTransformer(tiny_config(small_tokenizer, block_length=8)),
                    small_tokenizer)
    return d


def _args(base_dir, out, steps: int) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(["--model", str(base_dir), "--data", str(stdlib_dir() / "json"),
                         "--out", str(out), "--max-steps", str(steps), "--batch-size", "2",
                         "--seq-len", "48", "--eval-every", "2", "--ckpt-every", "2",
                         "--eval-batches", "1", "--rank", "4", "--warmup", "1",
                         "--held-out-percent", "30", "--threads", "1"])


def test_resumed_run_equals_an_uninterrupted_one_and_serves(base_dir, tmp_path):
    straight = train_lora(_args(base_dir, tmp_path / "a", 4))
    train_lora(_args(base_dir, tmp_path / "b", 2))
    resumed = train_lora(_args(base_dir, tmp_path / "b", 4))
    wa = load_file(str(straight / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2  # A and B of 7 Linears x 2 layers
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert any(wa[k].abs().max() > 0 for k in wa if "lora_B" in k)  # B left zero

    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    steps = [h["step"] for h in log["history"]]
    assert steps == [0, 2, 4] and log["held_out_files"]

    net, _, cfg = load_pretrained(base_dir, progress=False)
    ids = torch.randint(3, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        before = net(ids)
        bank = apply_lora(net, 1, 4)
        slot = bank.acquire(read_adapter(straight, base=base_dir, cfg=cfg))
        with bank.using(slot):
            after = net(ids)
    assert (after - before).abs().max() > 1e-4


def test_held_out_split_keeps_a_file_on_each_side():
    files = {f"f{i}.py": "x = 1\n" for i in range(3)}
    train, held = split_held_out(files, 0)
    assert len(held) == 1 and len(train) == 2
    train, held = split_held_out(files, 100)
    assert len(train) == 1 and len(held) == 2
    with pytest.raises(ValueError):
        split_held_out({"a.py": ""}, 10)
