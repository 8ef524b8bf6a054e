"""LoRA adapters built with the real `peft` library load onto our network (model/loaders/lora.py,
model/lora.py) and give the logits of the weights peft merges itself.

For a DiffuLLaMA (transformers Llama names, rsLoRA, modules_to_save on the LM head) and a GPT-2
(Conv1D, fused c_attn split into our wq/wk/wv) checkpoint, the test wraps the transformers model
in peft with random LoRA weights, saves the adapter, lets peft merge_and_unload() and saves the
merged model as a checkpoint of the same format. Our network with the adapter in a slot (per-row
hooks) and with merge_adapter must both give the merged checkpoint's logits (fp32, atol 1e-4),
rows without an adapter the base logits, and a batch mixing adapters and none each row's own.
Tensor parallelism: two gloo ranks, each holding its slice of the base and of the adapter, give
the unsharded logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model import load_pretrained
from model.config import ModelConfig
from model.loaders import FormatError
from model.loaders.lora import AdapterWeights, LoRAModule, read_adapter, write_adapter
from model.lora import AdapterError, apply_lora, merge_adapter
from model.parallel import load_sharded, run_tp
from tests.model.test_loaders import make_diffugpt, make_diffullama, random_ids

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _randomize_adapter(pm, seed: int) -> None:
    """peft starts B at zero (a no-op adapter); random A, B and saved modules make it bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_pair(base_dir: Path, root: Path, name: str, model_cls, lora_kwargs: dict, seed: int):
    """-> (adapter dir, merged checkpoint dir) built by peft from the checkpoint in base_dir."""
    hf = model_cls.from_pretrained(str(base_dir), dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**lora_kwargs))
    _randomize_adapter(pm, seed)
    adapter_dir, merged_dir = root / f"{name}-adapter", root / f"{name}-merged"
    pm.save_pretrained(str(adapter_dir))
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    for f in base_dir.iterdir():  # the tokenizer files (and the base config's ids)
        if f.name.startswith("tokenizer") or f.name == "config.json":
            shutil.copy(f, merged_dir / f.name)
    return adapter_dir, merged_dir


@pytest.fixture(scope="module")
def peft_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpts")
    make_diffullama(root / "llama")
    W, c, *_ = make_diffugpt(root / "gpt2", diffugpt_names=False)
    # the maker leaves config.json's vocab_size one short of the stored embedding (DiffuGPT's
    # resize); transformers refuses that, so state the stored size
    c["vocab_size"] = W["transformer.wte.weight"].shape[0]
    (root / "gpt2" / "config.json").write_text(json.dumps(c))
    out = {"llama": (root / "llama",) + _peft_pair(
        root / "llama", root, "llama", transformers.LlamaForCausalLM,
        dict(r=4, lora_alpha=6, use_rslora=True, modules_to_save=["lm_head"],
             target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]), 1)}
    out["llama2"] = (root / "llama",) + _peft_pair(  # a second adapter of another rank
        root / "llama", root, "llama2", transformers.LlamaForCausalLM,
        dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]), 2)
    out["gpt2"] = (root / "gpt2",) + _peft_pair(
        root / "gpt2", root, "gpt2", transformers.GPT2LMHeadModel,
        dict(r=3, lora_alpha=5, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        3)
    return out


def _logits(net, ids):
    with torch.no_grad():
        return net(ids).float()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_adapter_per_row_and_merged_equal_peft_merged_weights(peft_ckpts, kind):
    base_dir, adapter_dir, merged_dir = peft_ckpts[kind]
    net, _, cfg = load_pretrained(base_dir, progress=False)
    merged, _, _ = load_pretrained(merged_dir, progress=False)
    adapter = read_adapter(adapter_dir, base=base_dir, cfg=cfg, name="a")
    if kind == "gpt2":  # the fused c_attn became three modules sharing A
        assert {"layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv"} <= set(adapter.lora)
        assert adapter.lora["layers.0.attn.wq"].a is adapter.lora["layers.0.attn.wk"].a
    else:
        assert adapter.config["use_rslora"] and "lm_head.weight" in adapter.replace
    ids = random_ids(cfg.vocab_size, B=3, T=10)
    base_logits, want = _logits(net, ids), _logits(merged, ids)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the answer

    bank = apply_lora(net, max_loras=2, max_lora_rank=8)
    slot = bank.acquire(adapter)
    with bank.using(slot):
        torch.testing.assert_close(_logits(net, ids), want, atol=ATOL, rtol=0)
    bank.set_rows([-1, slot, -1])  # a mixed batch: row 1 only
    got = _logits(net, ids)
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[[0, 2]], base_logits[[0, 2]], atol=ATOL, rtol=0)

    bank.remove()
    net.lora_bank = None
    merge_adapter(net, adapter)
    torch.testing.assert_close(_logits(net, ids), want, atol=ATOL, rtol=0)


def test_mixed_batch_of_two_adapters_and_none_gives_each_row_its_own(peft_ckpts):
    base_dir, a1_dir, m1_dir = peft_ckpts["llama"]
    _, a2_dir, m2_dir = peft_ckpts["llama2"]
    net, _, cfg = load_pretrained(base_dir, progress=False)
    alone = {None: _logits(net, random_ids(cfg.vocab_size, B=4, T=9))}
    ids = random_ids(cfg.vocab_size, B=4, T=9)
    alone["a1"] = _logits(load_pretrained(m1_dir, progress=False)[0], ids)
    alone["a2"] = _logits(load_pretrained(m2_dir, progress=False)[0], ids)
    alone[None] = _logits(net, ids)
    bank = apply_lora(net, max_loras=2, max_lora_rank=4)
    s1 = bank.acquire(read_adapter(a1_dir, base=base_dir, cfg=cfg, name="a1"))
    s2 = bank.acquire(read_adapter(a2_dir, base=base_dir, cfg=cfg, name="a2"))
    rows = ["a2", None, "a1", "a2"]
    bank.set_rows([{None: -1, "a1": s1, "a2": s2}[r] for r in rows])
    got = _logits(net, ids)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i], alone[r][i], atol=ATOL, rtol=0)


def test_residency_is_bounded_and_least_recently_used_goes(peft_ckpts):
    base_dir, a1_dir, _ = peft_ckpts["llama"]
    net, _, cfg = load_pretrained(base_dir, progress=False)
    bank = apply_lora(net, max_loras=2, max_lora_rank=4)
    ads = {n: read_adapter(a1_dir, base=base_dir, cfg=cfg, name=n) for n in "xyz"}
    sx = bank.acquire(ads["x"])
    sy = bank.acquire(ads["y"])
    assert bank.acquire(ads["z"]) is None  # both pinned: z waits
    bank.release(sx)
    bank.release(sy)
    bank.acquire(ads["x"])  # x is now the most recently used
    bank.release(sx)
    sz = bank.acquire(ads["z"])
    assert sz == sy and bank.resident() == ["x", "z"] and bank.evictions == 1


def test_refusals(peft_ckpts, tmp_path):
    base_dir, a1_dir, _ = peft_ckpts["llama"]
    net, _, cfg = load_pretrained(base_dir, progress=False)
    bank = apply_lora(net, max_loras=1, max_lora_rank=2)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        bank.acquire(read_adapter(a1_dir, base=base_dir, cfg=cfg))
    bad = tmp_path / "dora"
    shutil.copytree(a1_dir, bad)
    conf = (bad / "adapter_config.json").read_text().replace('"use_dora": false',
                                                             '"use_dora": true')
    (bad / "adapter_config.json").write_text(conf)
    with pytest.raises(FormatError, match="DoRA"):
        read_adapter(bad, base=base_dir, cfg=cfg)
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "nowhere", base=base_dir, cfg=cfg)


def test_write_adapter_round_trips_through_peft_names(tmp_path):
    """What `dllm train --lora` writes reads back, and peft itself loads it onto our module."""
    from model.loaders import native
    from model.transformer import DiffusionTransformer

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      mlp_hidden=64, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    ad = AdapterWeights("t", None, {"layers.0.attn.wq": LoRAModule(
        torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 2.0)})
    write_adapter(tmp_path / "t", ad, alpha=8.0)
    back = read_adapter(tmp_path / "t", map_tensor=native.map_tensor, cfg=cfg)
    torch.testing.assert_close(back.lora["layers.0.attn.wq"].b, ad.lora["layers.0.attn.wq"].b)
    assert back.lora["layers.0.attn.wq"].scale == 2.0  # alpha 8 / r 4
    torch.manual_seed(0)
    net = DiffusionTransformer(cfg)
    pm = peft.PeftModel.from_pretrained(net, str(tmp_path / "t"))
    loaded = dict(pm.named_parameters())
    key = next(k for k in loaded if k.endswith("layers.0.attn.wq.lora_B.default.weight"))
    torch.testing.assert_close(loaded[key], ad.lora["layers.0.attn.wq"].b)


def _tp_worker(rank, world, device, cases):
    """Each (base, adapter, ids): this rank's slice of both; row 0 adapted, row 1 the base."""
    out = []
    for base_dir, adapter_dir, ids in cases:
        net, _, cfg = load_sharded(str(base_dir), rank, world)
        bank = apply_lora(net, max_loras=1, max_lora_rank=8)
        slot = bank.acquire(read_adapter(adapter_dir, base=base_dir, cfg=cfg))
        bank.set_rows([slot, -1])
        with torch.no_grad():
            out.append(net(ids).float())
    return out


def test_tensor_parallel_two_ranks_equal_one_with_an_adapter(peft_ckpts):
    """Llama (GQA-free q/k/v, SwiGLU) and GPT-2 (fused c_attn, biases) in one spawn."""
    cases, want = [], []
    for kind in ("llama", "gpt2"):
        base_dir, adapter_dir, merged_dir = peft_ckpts[kind]
        merged, _, cfg = load_pretrained(merged_dir, progress=False)
        base, _, _ = load_pretrained(base_dir, progress=False)
        ids = random_ids(cfg.vocab_size, B=2, T=8)
        cases.append((base_dir, adapter_dir, ids))
        want.append((_logits(merged, ids)[0], _logits(base, ids)[1]))
    got = run_tp(_tp_worker, 2, cases)
    for g, (adapted, plain) in zip(got, want, strict=True):
        torch.testing.assert_close(g[0], adapted, atol=ATOL, rtol=0)
        torch.testing.assert_close(g[1], plain, atol=ATOL, rtol=0)
