"""Scaled rotary (model/rope.py + kernels/rotary*.py) equals transformers' for every type.

The frequencies and the attention factor are pinned to transformers' own ROPE_INIT_FUNCTIONS
(transformers.modeling_rope_utils) on a LlamaConfig carrying the same `rope_parameters`; cos/sin
to its LlamaRotaryEmbedding (which applies the attention factor); the rotation of q and k, full
and partial, to its apply_rotary_pos_emb on the rotated dims. The Triton kernel (under
TRITON_INTERPRET=1 on the CPU) is pinned to the torch reference with partial rotary.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import apply_rotary, apply_rotary_reference, rotary_cos_sin
from model.config import ModelConfig
from model.rope import (
    apply_context_overrides,
    normalise_rope_scaling,
    rope_frequencies,
    scaled_inv_freq,
)

HD, THETA, TRAINED = 64, 10000.0, 2048


def _hf():
    """transformers' rope pieces (the GPU check runs tests/kernels with torch + triton only:
    there the pins to transformers skip and the Triton checks still run)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    return LlamaConfig, ROPE_INIT_FUNCTIONS, LlamaRotaryEmbedding, apply_rotary_pos_emb

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3,
                              "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": TRAINED},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": TRAINED},
    "yarn_untruncated": {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                         "original_max_position_embeddings": TRAINED},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
}


def hf_config(scaling: dict, partial: float = 1.0):
    LlamaConfig = _hf()[0]
    params = {**scaling, "rope_theta": THETA}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    return LlamaConfig(hidden_size=HD * 4, num_attention_heads=4, max_position_embeddings=TRAINED,
                       rope_parameters=params)


def ours(scaling: dict, partial: float = 1.0, seq_len: int | None = None):
    dim = int(HD * partial)
    return scaled_inv_freq(THETA, dim, normalise_rope_scaling(scaling, TRAINED), seq_len)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_frequencies_equal_transformers_rope_init(name, partial):
    scaling = SCALINGS[name]
    ROPE_INIT_FUNCTIONS = _hf()[1]
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(scaling, partial),
                                                                 "cpu")
    got, scale = ours(scaling, partial)
    assert got.shape == want.shape == (int(HD * partial) // 2,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    # and they really are scaled (dynamic NTK only past the trained length: the next test)
    base, _ = scaled_inv_freq(THETA, int(HD * partial), None)
    assert torch.allclose(got, base) == (scaling["rope_type"] == "dynamic")


@pytest.mark.parametrize("seq_len", [TRAINED, 3 * TRAINED, 8 * TRAINED])
def test_dynamic_ntk_at_the_served_length_equals_transformers(seq_len):
    scaling = SCALINGS["dynamic"]
    ROPE_INIT_FUNCTIONS = _hf()[1]
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(scaling), "cpu", seq_len=seq_len)
    got, _ = ours(scaling, seq_len=seq_len)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    base, _ = scaled_inv_freq(THETA, HD, None)
    assert torch.allclose(got, base) == (seq_len == TRAINED)


@pytest.mark.parametrize("name", ["linear", "yarn", "yarn_mscale", "llama3"])
def test_cos_sin_equal_llama_rotary_embedding(name):
    """cos/sin with the attention factor folded in, as transformers' rotary module returns."""
    scaling = SCALINGS[name]
    LlamaRotaryEmbedding = _hf()[2]
    rot = LlamaRotaryEmbedding(hf_config(scaling))
    pos = torch.tensor([[0, 1, 7, 2047, 2048, 5000, 8191]])
    x = torch.zeros(1, pos.shape[1], HD)
    want_cos, want_sin = rot(x, pos)  # [1, L, hd]
    inv, scale = ours(scaling)
    cos, sin = rotary_cos_sin(pos, HD, THETA, inv_freq=inv, attention_scaling=scale)
    torch.testing.assert_close(cos[:, 0], want_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[:, 0], want_sin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partial", [1.0, 0.5, 0.25])
def test_rotation_equals_transformers_apply_rotary_pos_emb(partial):
    """Full and partial rotary: the first rotary_dim dims rotate as transformers rotates them,
    the rest pass through (Phi / GLM / LLaDA2.x partial rotary)."""
    scaling = SCALINGS["yarn"]
    apply_rotary_pos_emb = _hf()[3]
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L = 2, 4, 2, 9
    q = torch.randn(B, H, L, HD, generator=g)
    k = torch.randn(B, Hkv, L, HD, generator=g)
    pos = torch.arange(L)[None].expand(B, L) * 700
    inv, scale = ours(scaling, partial)
    cos, sin = rotary_cos_sin(pos, HD, THETA, inv_freq=inv, attention_scaling=scale)
    rd = cos.shape[-1]
    assert rd == int(HD * partial)
    got_q, got_k = apply_rotary_reference(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos[:, 0], sin[:, 0])
    torch.testing.assert_close(got_q[..., :rd], want_q)
    torch.testing.assert_close(got_k[..., :rd], want_k)
    assert torch.equal(got_q[..., rd:], q[..., rd:]) and torch.equal(got_k[..., rd:], k[..., rd:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd,rd", [(64, 32), (34, 18), (40, 40)])
def test_triton_partial_rotary_matches_reference(hd, rd, dtype, device, report):
    g = torch.Generator().manual_seed(hd + rd)
    B, H, Hkv, L = 2, 6, 2, 5
    # [B, L, H, hd] memory viewed as [B, H, L, hd], as the attention module hands q over
    q = torch.randn(B, L, H, hd, generator=g).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(B, L, Hkv, hd, generator=g).to(dtype).to(device).transpose(1, 2)
    inv, scale = scaled_inv_freq(THETA, rd, normalise_rope_scaling(SCALINGS["yarn"], TRAINED))
    pos = (torch.arange(L)[None].expand(B, L) * 1000).to(device)
    cos, sin = rotary_cos_sin(pos, hd, THETA, dtype, inv_freq=inv, attention_scaling=scale)
    from kernels import rotary_triton

    got = rotary_triton.apply_rotary(q, k, cos, sin)
    want = apply_rotary_reference(q, k, cos, sin)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for name, a, b in (("q", got[0], want[0]), ("k", got[1], want[1])):
        report(f"rotary partial {name} hd={hd} rd={rd} {dtype}", a, b)
        torch.testing.assert_close(a.float(), b.float(), **tol)
        assert torch.equal(a[..., rd:], b[..., rd:])  # passed through bit for bit


def test_dispatch_takes_partial_cos_sin(device, monkeypatch):
    monkeypatch.setenv("DLLM_KERNELS", "triton")
    q = torch.randn(1, 2, 3, 16, device=device)
    k = torch.randn(1, 2, 3, 16, device=device)
    cos, sin = rotary_cos_sin(torch.arange(3, device=device)[None], 16, THETA,
                              inv_freq=scaled_inv_freq(THETA, 8, None)[0])
    got = apply_rotary(q, k, cos, sin)
    want = apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(got[0], want[0])


def test_config_round_trip_and_validation():
    cfg = ModelConfig(d_model=128, n_heads=2, n_kv_heads=1, partial_rotary_factor=0.5)
    cfg.rope_scaling = normalise_rope_scaling({"type": "linear", "factor": 2}, cfg.max_seq_len)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0,
                                "original_max_position_embeddings": 2048}
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.rope_scaling == cfg.rope_scaling and back.rotary_dim == 32
    inv, scale = rope_frequencies(back)
    assert inv.shape == (16,) and scale == 1.0
    with pytest.raises(ValueError, match="longrope"):
        normalise_rope_scaling({"rope_type": "longrope", "factor": 2}, 2048)
    with pytest.raises(ValueError, match="low_freq_factor"):
        normalise_rope_scaling({"rope_type": "llama3", "factor": 8}, 2048)
    with pytest.raises(ValueError, match=">= 1"):
        normalise_rope_scaling({"rope_type": "linear", "factor": 0.5}, 2048)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig(partial_rotary_factor=0.0)


def test_deploy_overrides_stretch_the_context_and_refuse_past_it():
    cfg = ModelConfig.from_name("tiny-coder")  # trained at 2048
    with pytest.raises(ValueError, match="set model.rope_scaling"):
        apply_context_overrides(cfg, max_model_len=8192)
    assert cfg.max_seq_len == 2048
    apply_context_overrides(cfg, rope_scaling={"rope_type": "linear", "factor": 4},
                            max_model_len=8192)
    assert cfg.max_seq_len == 8192 and cfg.rope_scaling["factor"] == 4.0
    assert cfg.extra["trained_max_seq_len"] == 2048
    with pytest.raises(ValueError, match="8192"):
        apply_context_overrides(cfg, max_model_len=8193)
    # scaling alone serves the whole stretched context
    cfg2 = ModelConfig.from_name("tiny-coder")
    apply_context_overrides(cfg2, rope_scaling={"rope_type": "yarn", "factor": 2})
    assert cfg2.max_seq_len == 4096
    # a shorter context needs no scaling
    cfg3 = ModelConfig.from_name("tiny-coder")
    apply_context_overrides(cfg3, max_model_len=1024)
    assert cfg3.max_seq_len == 1024 and cfg3.rope_scaling is None
