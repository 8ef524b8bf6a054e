"""A published checkpoint's rope scaling and partial rotary are read and reproduced.

A DiffuLLaMA-format (transformers Llama) checkpoint from tests/model/test_loaders.make_diffullama
gets `rope_scaling` and `partial_rotary_factor` in its config.json; the loaded network's logits
must equal a float64 reference forward (Llama with the causal mask removed, shifted) whose
rotary comes from transformers itself: ROPE_INIT_FUNCTIONS on a LlamaConfig of the same
config.json, applied with apply_rotary_pos_emb to the first rotary_dim dims of each head. Also:
the deploy-time override through load_pretrained, and an unsupported type refused.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from model import load_pretrained
from model.loaders import FormatError
from tests.model.test_loaders import (
    assert_close,
    heads,
    make_diffullama,
    merge,
    random_ids,
    ref_attention,
    ref_rmsnorm,
    shift_right,
)

T = 40  # positions past original_max_position_embeddings (16): the scaling matters


def hf_rotary(c: dict, T: int, seq_len: int | None = None):
    """cos, sin [T, rd] (float64) and rd, from transformers' rope init on this config.json
    (seq_len: the length dynamic NTK is evaluated at)."""
    hc = LlamaConfig(**{k: v for k, v in c.items() if k not in ("model_type", "architectures")})
    kind = hc.rope_parameters.get("rope_type", "default")
    inv, scale = ROPE_INIT_FUNCTIONS[kind](hc, "cpu", seq_len=seq_len)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv.double()[None]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos() * scale, emb.sin() * scale, emb.shape[-1]


def ref_llama_scaled(W, c, ids, seq_len: int | None = None):
    W = {k: v.double() for k, v in W.items()}
    H, Hkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    cos, sin, rd = hf_rotary(c, ids.shape[1], seq_len)

    def rope(x):
        r, rest = x[..., :rd], x[..., rd:]
        r, _ = apply_rotary_pos_emb(r, r, cos[None], sin[None])
        return torch.cat([r, rest], dim=-1)

    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        h = ref_rmsnorm(x, W[b + "input_layernorm.weight"], eps)
        q = rope(heads(h @ W[b + "self_attn.q_proj.weight"].T, H))
        k = rope(heads(h @ W[b + "self_attn.k_proj.weight"].T, Hkv))
        v = heads(h @ W[b + "self_attn.v_proj.weight"].T, Hkv)
        x = x + merge(ref_attention(q, k, v)) @ W[b + "self_attn.o_proj.weight"].T
        h = ref_rmsnorm(x, W[b + "post_attention_layernorm.weight"], eps)
        x = x + (F.silu(h @ W[b + "mlp.gate_proj.weight"].T) * (h @ W[b + "mlp.up_proj.weight"].T)) \
            @ W[b + "mlp.down_proj.weight"].T
    x = ref_rmsnorm(x, W["model.norm.weight"], eps)
    return shift_right(x @ W["lm_head.weight"].T)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("rope_ckpt") / "diffullama"
    W, c, ids = make_diffullama(d)
    return d, W, c


def _variant(tmp_path, base, **changes):
    d, W, c = base
    v = tmp_path / "variant"
    v.mkdir()
    for f in d.iterdir():
        if f.name != "config.json":
            (v / f.name).symlink_to(f)
    c = c | changes
    (v / "config.json").write_text(json.dumps(c))
    return v, W, c


SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"type": "dynamic", "factor": 2.0},  # the transformers 4.x key
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
]


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.get("rope_type", s.get("type")))
def test_scaled_and_partial_rotary_logits_match_transformers_rotary(tmp_path, base, scaling,
                                                                    partial):
    changes = {"rope_scaling": scaling, "max_position_embeddings": 16}
    if partial != 1.0:
        changes["partial_rotary_factor"] = partial
    d, W, c = _variant(tmp_path, base, **changes)
    net, tok, cfg = load_pretrained(d, progress=False)
    assert cfg.rope_scaling["rope_type"] == scaling.get("rope_type", scaling.get("type"))
    assert cfg.rotary_dim == int(cfg.head_dim * partial)
    if scaling.get("type") == "dynamic":
        # dynamic NTK is evaluated at the served context: serve 2x the trained 16 tokens, the
        # reference at the same length (transformers grows it to the longest position seen)
        net, tok, cfg = load_pretrained(d, progress=False, max_model_len=32)
        x = random_ids(cfg.vocab_size, T=32)
        ref = ref_llama_scaled(W, c, x, seq_len=32)
    else:
        x = random_ids(cfg.vocab_size, T=T)
        ref = ref_llama_scaled(W, c, x)
    with torch.no_grad():
        assert_close(net(x), ref)
    plain, _, _ = load_pretrained(base[0], progress=False)
    with torch.no_grad():  # and the scaling is not a no-op here
        assert (plain(x).double() - ref).abs().max() > 1e-2


def test_deploy_override_equals_the_same_scaling_in_config_json(tmp_path, base):
    d, W, c = base
    over, _, cfg = load_pretrained(d, progress=False, max_model_len=1024,
                                   rope_scaling={"rope_type": "linear", "factor": 4})
    assert (cfg.max_seq_len, cfg.extra["trained_max_seq_len"]) == (1024, 256)
    v, _, _ = _variant(tmp_path, base, rope_scaling={"rope_type": "linear", "factor": 4.0})
    native, _, _ = load_pretrained(v, progress=False)
    x = random_ids(cfg.vocab_size, T=T)
    with torch.no_grad():
        torch.testing.assert_close(over(x), native(x))


def test_unsupported_scaling_is_refused(tmp_path, base):
    v, _, _ = _variant(tmp_path, base, rope_scaling={"rope_type": "longrope", "factor": 4.0,
                                                     "long_factor": [1.0], "short_factor": [1.0]})
    with pytest.raises(FormatError, match="longrope"):
        load_pretrained(v, progress=False)
