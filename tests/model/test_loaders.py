"""Published checkpoint formats load onto DiffusionTransformer and compute what their authors' code
computes.

For each format the test writes a tiny random checkpoint with that format's tensor names, shape
rules, config.json fields and a tokenizer (built here with `tokenizers`), loads it with
`load_pretrained`, and compares the logits with a reference forward written below from the
published architecture (LLaDA's OLMo block, Qwen2/Llama, GPT-2 Conv1D, the DDiT block), which
shares no code with the loaders or the network. The references run in float64; the loaded
network in float32, so agreement is to float32 rounding (atol 1e-4 on logits of magnitude ~1-10).
Also: sharded (index + two shards) == single file, tensor-parallel slices reassemble to the full
weights and give the same logits through an all-reduce, tokenizers keep user text as text and
never run the checkpoint's Python files, and unsupported variants are refused.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawBPE

from model import load_pretrained
from model.families import family_defaults
from model.hf_tokenizer import NoChatTemplate, NoFimFormat
from model.loaders import FormatError, resolve_path
from model.loaders.tp import ROW
from model.sampling import SamplingParams, generate
from model.transformer import DenseAttention

ATOL = 1e-4
TEXT = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog. " * 3,
        "Hello, world! How are you today? I am fine, thank you.", "for i in range(10): print(i)"]

# A file that records its execution: a checkpoint's Python must never run.
TRAP = "import pathlib\npathlib.Path(__file__).with_suffix('.RAN').write_text('ran')\n"


# --------------------------------------------------------------------------------------------
# tokenizers and files
# --------------------------------------------------------------------------------------------
def _bpe(n_merges: int = 60) -> RawBPE:
    tok = RawBPE(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 5, trainer=trainer)
    return tok


def write_tokenizer_json(d: Path, specials: list[str], config: dict,
                         bos_first: str | None = None) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json; -> special token ids. bos_first: a post-processor
    that starts every encoding with that token (Llama-2's tokenizer.json does, with <s>)."""
    tok = _bpe()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos_first:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_first} $A", pair=f"{bos_first} $A $B",
            special_tokens=[(bos_first, tok.token_to_id(bos_first))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return {s: tok.token_to_id(s) for s in specials}


def write_vocab_merges(d: Path, specials: list[str], config: dict) -> dict[str, int]:
    """vocab.json + merges.txt (+ added tokens in tokenizer_config.json), as Dream ships it."""
    tok = _bpe()
    n = tok.get_vocab_size()
    tok.model.save(str(d))
    ids = {s: n + i for i, s in enumerate(specials)}
    config = dict(config, added_tokens_decoder={
        str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                 "rstrip": False, "single_word": False} for s, i in ids.items()})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return ids


def write_checkpoint(d: Path, config: dict, weights: dict[str, torch.Tensor],
                     shards: int = 1) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[s * per:(s + 1) * per]}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
         "weight_map": weight_map}))


def randn(g: torch.Generator, *shape, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def norm_weight(g: torch.Generator, d: int) -> torch.Tensor:
    return 1 + randn(g, d, std=0.1)


# --------------------------------------------------------------------------------------------
# reference maths (float64), written from the published architectures
# --------------------------------------------------------------------------------------------
def ref_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y + b if b is not None else y


def ref_rotate_half_rope(x, theta):
    """x: [B, H, T, hd]; GPT-NeoX / Llama rotary: pairs (i, i + hd/2), positions 0..T-1."""
    T, hd = x.shape[2], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_attention(q, k, v, allowed=None):
    """q: [B, H, T, hd], k/v: [B, Hkv, T, hd]; allowed: bool [T, T] or None (bidirectional)."""
    rep = q.shape[1] // k.shape[1]
    k = torch.repeat_interleave(k, rep, dim=1)
    v = torch.repeat_interleave(v, rep, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def heads(x, n):  # [B, T, n*hd] -> [B, n, T, hd]
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge(x):  # [B, n, T, hd] -> [B, T, n*hd]
    B, n, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, n * hd)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def shift_right(logits):
    """Dream / DiffuLLaMA / DiffuGPT: the prediction for token i is read at position i-1."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def ref_llada(W, c, ids):
    """LLaDA's LLaDALlamaBlock stack (OLMo names), no causal mask, no shift."""
    P = "model.transformer."
    W = {k: v.double() for k, v in W.items()}
    H, Hkv, eps = c["n_heads"], c["n_kv_heads"], c["rms_norm_eps"]
    x = W[P + "wte.weight"][ids]
    for i in range(c["n_layers"]):
        b = f"{P}blocks.{i}."
        h = ref_rmsnorm(x, W[b + "attn_norm.weight"], eps)
        q = ref_rotate_half_rope(heads(h @ W[b + "q_proj.weight"].T, H), c["rope_theta"])
        k = ref_rotate_half_rope(heads(h @ W[b + "k_proj.weight"].T, Hkv), c["rope_theta"])
        v = heads(h @ W[b + "v_proj.weight"].T, Hkv)
        x = x + merge(ref_attention(q, k, v)) @ W[b + "attn_out.weight"].T
        h = ref_rmsnorm(x, W[b + "ff_norm.weight"], eps)
        x = x + (F.silu(h @ W[b + "ff_proj.weight"].T) * (h @ W[b + "up_proj.weight"].T)) \
            @ W[b + "ff_out.weight"].T
    x = ref_rmsnorm(x, W[P + "ln_f.weight"], eps)
    return x @ W[P + "ff_out.weight"].T


def ref_qwen2_llama(W, c, ids, bias: bool):
    """transformers' Qwen2 / Llama decoder with the causal mask removed (Dream, DiffuLLaMA)."""
    W = {k: v.double() for k, v in W.items()}
    H, Hkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."

        def proj(h, n, b=b):
            y = h @ W[f"{b}self_attn.{n}_proj.weight"].T
            return y + W[f"{b}self_attn.{n}_proj.bias"] if bias else y

        h = ref_rmsnorm(x, W[b + "input_layernorm.weight"], eps)
        q = ref_rotate_half_rope(heads(proj(h, "q"), H), c["rope_theta"])
        k = ref_rotate_half_rope(heads(proj(h, "k"), Hkv), c["rope_theta"])
        v = heads(proj(h, "v"), Hkv)
        x = x + merge(ref_attention(q, k, v)) @ W[b + "self_attn.o_proj.weight"].T
        h = ref_rmsnorm(x, W[b + "post_attention_layernorm.weight"], eps)
        x = x + (F.silu(h @ W[b + "mlp.gate_proj.weight"].T) * (h @ W[b + "mlp.up_proj.weight"].T)) \
            @ W[b + "mlp.down_proj.weight"].T
    x = ref_rmsnorm(x, W["model.norm.weight"], eps)
    return shift_right(x @ W["lm_head.weight"].T)


def ref_gpt2(W, c, ids, prefix: str, wte: str):
    """GPT-2 with Conv1D weights ([in, out]: y = x @ W + b), causal mask removed, shifted."""
    W = {k: v.double() for k, v in W.items()}
    H, eps, d = c["n_head"], c["layer_norm_epsilon"], c["n_embd"]
    T = ids.shape[1]
    x = W[wte][ids] + W[prefix + "wpe.weight"][torch.arange(T)]
    for i in range(c["n_layer"]):
        b = f"{prefix}h.{i}."
        h = ref_layernorm(x, W[b + "ln_1.weight"], W[b + "ln_1.bias"], eps)
        qkv = h @ W[b + "attn.c_attn.weight"] + W[b + "attn.c_attn.bias"]
        q, k, v = (heads(t, H) for t in qkv.split(d, dim=-1))
        x = x + merge(ref_attention(q, k, v)) @ W[b + "attn.c_proj.weight"] + W[b + "attn.c_proj.bias"]
        h = ref_layernorm(x, W[b + "ln_2.weight"], W[b + "ln_2.bias"], eps)
        h = gelu_tanh(h @ W[b + "mlp.c_fc.weight"] + W[b + "mlp.c_fc.bias"])
        x = x + h @ W[b + "mlp.c_proj.weight"] + W[b + "mlp.c_proj.bias"]
    x = ref_layernorm(x, W[prefix + "ln_f.weight"], W[prefix + "ln_f.bias"], eps)
    return shift_right(x @ W[wte].T)


def ref_ddit(W, c, ids, allowed):
    """The DDiT backbone of BD3-LM / MDLM with time_conditioning=false (sigma = 0)."""
    P = "backbone."
    W = {k: v.double() for k, v in W.items()}
    H, d = c["n_heads"], c["hidden_dim"]
    B = ids.shape[0]
    sigma = torch.zeros(B, dtype=torch.float64)
    half = W[P + "sigma_map.mlp.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.silu(t_freq @ W[P + "sigma_map.mlp.0.weight"].T + W[P + "sigma_map.mlp.0.bias"]) \
        @ W[P + "sigma_map.mlp.2.weight"].T + W[P + "sigma_map.mlp.2.bias"]
    cvec = F.silu(temb)[:, None, :]  # [B, 1, cond]

    def ln(x, w):  # F.layer_norm without affine, then * weight
        return ref_layernorm(x, w, None, 1e-5)

    x = W[P + "vocab_embed.embedding"][ids]
    for i in range(c["n_blocks"]):
        b = f"{P}blocks.{i}."
        mod = cvec @ W[b + "adaLN_modulation.weight"].T + W[b + "adaLN_modulation.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        h = ln(x, W[b + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = (h @ W[b + "attn_qkv.weight"].T).view(B, -1, 3, H, d // H)  # (three h d)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        q, k = ref_rotate_half_rope(q, 10000.0), ref_rotate_half_rope(k, 10000.0)
        x = x + g1 * (merge(ref_attention(q, k, v, allowed)) @ W[b + "attn_out.weight"].T)
        h = ln(x, W[b + "norm2.weight"]) * (1 + sc2) + sh2
        h = gelu_tanh(h @ W[b + "mlp.0.weight"].T + W[b + "mlp.0.bias"])
        x = x + g2 * (h @ W[b + "mlp.2.weight"].T + W[b + "mlp.2.bias"])
    mod = cvec @ W[P + "output_layer.adaLN_modulation.weight"].T \
        + W[P + "output_layer.adaLN_modulation.bias"]
    shift, scale = mod.chunk(2, dim=-1)
    x = ln(x, W[P + "output_layer.norm_final.weight"]) * (1 + scale) + shift
    return x @ W[P + "output_layer.linear.weight"].T + W[P + "output_layer.linear.bias"]


def block_causal(T: int, block: int) -> torch.Tensor:
    """BD3-LM's sampling mask on one copy: a query sees keys of its block and earlier ones."""
    blk = torch.arange(T) // block
    return blk[:, None] >= blk[None, :]


# --------------------------------------------------------------------------------------------
# the formats' tiny checkpoints
# --------------------------------------------------------------------------------------------
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|mdm_mask|>"]
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def make_llada(d: Path, seed: int = 0, shards: int = 1):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, LLADA_SPECIALS, {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": LLADA_TEMPLATE, "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    (d / "modeling_llada.py").write_text(TRAP)
    (d / "configuration_llada.py").write_text(TRAP)
    vocab = max(ids.values()) + 1
    emb_rows = vocab + 10  # LLaDA's embedding_size pads vocab_size
    c = {"model_type": "llada", "architectures": ["LLaDAModelLM"],
         "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                      "AutoModel": "modeling_llada.LLaDAModelLM"},
         "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 96,
         "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": emb_rows,
         "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": ids["<|endoftext|>"],
         "pad_token_id": ids["<|endoftext|>"], "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
         "max_sequence_length": 128, "weight_tying": False, "include_bias": False,
         "include_qkv_bias": False, "block_type": "llama", "layer_norm_type": "rms",
         "activation_type": "silu", "alibi": False, "rope": True, "attention_layer_norm": False,
         "scale_logits": False, "input_emb_norm": False, "rope_full_precision": True,
         "flash_attention": False, "precision": "amp_bf16", "init_device": "meta"}
    g = torch.Generator().manual_seed(seed)
    D, M, P = 32, 96, "model.transformer."
    W = {P + "wte.weight": randn(g, emb_rows, D, std=1.0), P + "ln_f.weight": norm_weight(g, D),
         P + "ff_out.weight": randn(g, emb_rows, D)}
    for i in range(2):
        b = f"{P}blocks.{i}."
        W |= {b + "attn_norm.weight": norm_weight(g, D), b + "ff_norm.weight": norm_weight(g, D),
              b + "q_proj.weight": randn(g, D, D), b + "k_proj.weight": randn(g, D, D),
              b + "v_proj.weight": randn(g, D, D), b + "attn_out.weight": randn(g, D, D),
              b + "ff_proj.weight": randn(g, M, D), b + "up_proj.weight": randn(g, M, D),
              b + "ff_out.weight": randn(g, D, M)}
    write_checkpoint(d, c, W, shards)
    return W, c, ids


DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
DREAM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] "
    "+ '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def llama_weights(g: torch.Generator, vocab: int, D: int, M: int, H: int, Hkv: int,
                  qkv_bias: bool, n_layers: int = 2) -> dict[str, torch.Tensor]:
    """Random transformers Llama / Qwen2 tensors (DiffuLLaMA, Dream): embedding, untied head,
    n_layers of RMSNorm + GQA attention (q/k/v biases for Qwen2) + SwiGLU."""
    hd = D // H
    W = {"model.embed_tokens.weight": randn(g, vocab, D, std=1.0),
         "model.norm.weight": norm_weight(g, D), "lm_head.weight": randn(g, vocab, D)}
    for i in range(n_layers):
        b = f"model.layers.{i}.self_attn."
        W |= {f"model.layers.{i}.input_layernorm.weight": norm_weight(g, D),
              f"model.layers.{i}.post_attention_layernorm.weight": norm_weight(g, D)}
        for proj, rows in (("q", H * hd), ("k", Hkv * hd), ("v", Hkv * hd)):
            W[b + f"{proj}_proj.weight"] = randn(g, rows, D)
            if qkv_bias:
                W[b + f"{proj}_proj.bias"] = randn(g, rows)
        W[b + "o_proj.weight"] = randn(g, D, H * hd)
        b = f"model.layers.{i}.mlp."
        W |= {b + "gate_proj.weight": randn(g, M, D), b + "up_proj.weight": randn(g, M, D),
              b + "down_proj.weight": randn(g, D, M)}
    return W


def make_dream(d: Path, seed: int = 1, shards: int = 1, tokenizer_json: bool = False):
    d.mkdir(parents=True, exist_ok=True)
    tcfg = {"bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "chat_template": DREAM_TEMPLATE,
            "tokenizer_class": "DreamTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}}
    ids = (write_tokenizer_json if tokenizer_json else write_vocab_merges)(d, DREAM_SPECIALS, tcfg)
    for f in ("tokenization_dream.py", "modeling_dream.py", "configuration_dream.py",
              "generation_utils.py"):
        (d / f).write_text(TRAP)
    vocab = max(ids.values()) + 1 + 6
    D, M, H, Hkv = 32, 80, 4, 2
    c = {"model_type": "Dream", "architectures": ["DreamModel"],
         "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                      "AutoModel": "modeling_dream.DreamModel"},
         "hidden_size": D, "intermediate_size": M, "num_hidden_layers": 2,
         "num_attention_heads": H, "num_key_value_heads": Hkv, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "vocab_size": vocab, "max_position_embeddings": 131072,
         "mask_token_id": ids["<|mask|>"], "eos_token_id": ids["<|endoftext|>"],
         "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|beginoftext|>"],
         "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 2, "rope_scaling": None,
         "attention_dropout": 0.0, "torch_dtype": "bfloat16"}
    W = llama_weights(torch.Generator().manual_seed(seed), vocab, D, M, H, Hkv, qkv_bias=True)
    write_checkpoint(d, c, W, shards)
    return W, c, ids


def make_diffullama(d: Path, seed: int = 2):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, ["<unk>", "<s>", "</s>"], {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"}, bos_first="<s>")
    vocab = 832  # > 811, DiffuLLaMA's mask id when the tokenizer names none (as published)
    D, M, H = 32, 88, 4
    c = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": D,
         "intermediate_size": M, "num_hidden_layers": 2, "num_attention_heads": H,
         "num_key_value_heads": H, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "vocab_size": vocab, "max_position_embeddings": 256, "bos_token_id": ids["<s>"],
         "eos_token_id": ids["</s>"], "pad_token_id": None, "tie_word_embeddings": False,
         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
         "rope_scaling": None, "torch_dtype": "bfloat16"}
    W = llama_weights(torch.Generator().manual_seed(seed), vocab, D, M, H, H, qkv_bias=False)
    write_checkpoint(d, c, W)
    return W, c, ids


def make_diffugpt(d: Path, seed: int = 3, diffugpt_names: bool = True, shards: int = 1):
    """diffugpt_names: DiscreteDiffusionModel's state dict (embed_tokens, denoise_model.*, only
    lm_head.weight stored of the tied pair, mask token added to the tokenizer and the embedding
    resized to an even size); else a plain GPT2LMHeadModel (transformer.*, causal-mask buffers)."""
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>"] + (["[MASK]"] if diffugpt_names else [])
    tcfg = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
    if diffugpt_names:
        tcfg["mask_token"] = "[MASK]"
    ids = write_tokenizer_json(d, specials, tcfg)
    n_tok = max(ids.values()) + 1
    vocab = n_tok + (n_tok % 2)  # resize_token_embeddings(len(tokenizer), pad_to_multiple_of=2)
    D, H, L, T = 32, 4, 2, 64
    c = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": D, "n_layer": L,
         "n_head": H, "n_positions": T, "n_ctx": T, "n_inner": None,
         "vocab_size": n_tok - (1 if diffugpt_names else 0),  # config.json not updated on resize
         "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
         "scale_attn_weights": True, "bos_token_id": ids["<|endoftext|>"],
         "eos_token_id": ids["<|endoftext|>"], "resid_pdrop": 0.1, "embd_pdrop": 0.1,
         "attn_pdrop": 0.1, "task_specific_params": {"text-generation": {"max_length": 50}}}
    if not diffugpt_names:
        c["mask_token_id"] = 7
    g = torch.Generator().manual_seed(seed)
    pre = "denoise_model." if diffugpt_names else "transformer."
    wte = "lm_head.weight" if diffugpt_names else "transformer.wte.weight"
    W = {wte: randn(g, vocab, D, std=1.0), pre + "wpe.weight": randn(g, T, D, std=0.5),
         pre + "ln_f.weight": norm_weight(g, D), pre + "ln_f.bias": randn(g, D, std=0.1)}
    for i in range(L):
        b = f"{pre}h.{i}."
        W |= {b + "ln_1.weight": norm_weight(g, D), b + "ln_1.bias": randn(g, D, std=0.1),
              b + "ln_2.weight": norm_weight(g, D), b + "ln_2.bias": randn(g, D, std=0.1),
              b + "attn.c_attn.weight": randn(g, D, 3 * D), b + "attn.c_attn.bias": randn(g, 3 * D),
              b + "attn.c_proj.weight": randn(g, D, D), b + "attn.c_proj.bias": randn(g, D),
              b + "mlp.c_fc.weight": randn(g, D, 4 * D), b + "mlp.c_fc.bias": randn(g, 4 * D),
              b + "mlp.c_proj.weight": randn(g, 4 * D, D), b + "mlp.c_proj.bias": randn(g, D)}
        if not diffugpt_names:  # older GPT-2 files keep the causal-mask buffers
            W[b + "attn.bias"] = torch.tril(torch.ones(T, T))[None, None]
            W[b + "attn.masked_bias"] = torch.tensor(-1e4)
    write_checkpoint(d, c, W, shards)
    return W, c, ids, pre, wte


def make_bd3lm(d: Path, seed: int = 4, model_type: str = "bd3lm", block_size: int = 4,
               adaln: bool = True):
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_json(d, ["<|endoftext|>"], {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer"})
    (d / "modeling_bd3lm.py").write_text(TRAP)
    vocab = max(ids.values()) + 2  # GPT-2 + the mask, appended last (mask = vocab - 1)
    D, H, L, C, T = 32, 4, 2, 16, 64
    c = {"model_type": model_type, "architectures": [model_type.upper()],
         "auto_map": {"AutoConfig": f"configuration_{model_type}.{model_type.upper()}Config",
                      "AutoModelForMaskedLM": f"modeling_{model_type}.{model_type.upper()}"},
         "vocab_size": vocab, "model_length": T, "hidden_dim": D, "cond_dim": C, "n_blocks": L,
         "n_heads": H, "dropout": 0.1, "time_conditioning": False, "adaln": adaln,
         "causal": False, "cross_attn": True, "attn_backend": "sdpa", "var_min": True,
         "sampling_eps_min": 1e-3, "sampling_eps_max": 0.999}
    if model_type == "bd3lm":
        c["block_size"] = block_size
    g = torch.Generator().manual_seed(seed)
    P = "backbone."
    hd = D // H
    W = {P + "vocab_embed.embedding": randn(g, vocab, D, std=1.0),
         P + "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)),
         P + "output_layer.norm_final.weight": norm_weight(g, D),
         P + "output_layer.linear.weight": randn(g, vocab, D),
         P + "output_layer.linear.bias": randn(g, vocab, std=0.1),
         "sampling_eps_min": torch.tensor(1e-3), "sampling_eps_max": torch.tensor(0.999)}
    if adaln:
        W |= {P + "sigma_map.mlp.0.weight": randn(g, C, 256), P + "sigma_map.mlp.0.bias": randn(g, C),
              P + "sigma_map.mlp.2.weight": randn(g, C, C), P + "sigma_map.mlp.2.bias": randn(g, C),
              P + "output_layer.adaLN_modulation.weight": randn(g, 2 * D, C),
              P + "output_layer.adaLN_modulation.bias": randn(g, 2 * D)}
    for i in range(L):
        b = f"{P}blocks.{i}."
        W |= {b + "norm1.weight": norm_weight(g, D), b + "norm2.weight": norm_weight(g, D),
              b + "attn_qkv.weight": randn(g, 3 * D, D), b + "attn_out.weight": randn(g, D, D),
              b + "mlp.0.weight": randn(g, 4 * D, D), b + "mlp.0.bias": randn(g, 4 * D),
              b + "mlp.2.weight": randn(g, D, 4 * D), b + "mlp.2.bias": randn(g, D)}
        if adaln:  # gates around 1 (random), as a trained model's are, not DiT's zero init
            W |= {b + "adaLN_modulation.weight": randn(g, 6 * D, C),
                  b + "adaLN_modulation.bias": randn(g, 6 * D) + 0.5}
    write_checkpoint(d, c, W)
    return W, c, ids


def random_ids(vocab: int, B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < ATOL * max(1.0, scale), f"max |ours - reference| = {err:.3g} (logit scale {scale:.3g})"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Every format written once for the module (the heaviest part of these tests)."""
    root = tmp_path_factory.mktemp("loader_ckpts")
    return {
        "llada": (root / "llada", make_llada(root / "llada")),
        "dream": (root / "dream", make_dream(root / "dream")),
        "diffullama": (root / "diffullama", make_diffullama(root / "diffullama")),
        "diffugpt": (root / "diffugpt", make_diffugpt(root / "diffugpt")),
        "gpt2": (root / "gpt2", make_diffugpt(root / "gpt2", diffugpt_names=False)),
        "bd3lm": (root / "bd3lm", make_bd3lm(root / "bd3lm")),
    }


# --------------------------------------------------------------------------------------------
# logits equal the published architecture's
# --------------------------------------------------------------------------------------------
def test_llada_logits_match_reference(ckpts):
    d, (W, c, ids) = ckpts["llada"]
    net, tok, cfg = load_pretrained(d, progress=False)
    assert (cfg.extra["family"], cfg.attention, cfg.logit_shift) == ("llada", "full", False)
    assert cfg.vocab_size == c["embedding_size"] and cfg.mask_id == ids["<|mdm_mask|>"]
    assert cfg.eot_id == ids["<|eot_id|>"] and cfg.eos_id == ids["<|endoftext|>"]
    x = random_ids(cfg.vocab_size)
    with torch.no_grad():
        assert_close(net(x), ref_llada(W, c, x))


def test_dream_logits_match_reference_with_shift_and_gqa(ckpts):
    d, (W, c, ids) = ckpts["dream"]
    net, tok, cfg = load_pretrained(d, progress=False)
    assert (cfg.extra["family"], cfg.logit_shift, cfg.qkv_bias, cfg.n_kv_heads) == \
        ("dream", True, True, 2)
    assert cfg.max_seq_len == 2048  # Dream's trained context, not Qwen2.5's 131072
    assert (cfg.mask_id, cfg.eot_id) == (ids["<|mask|>"], ids["<|im_end|>"])
    x = random_ids(cfg.vocab_size, seed=1)
    with torch.no_grad():
        assert_close(net(x), ref_qwen2_llama(W, c, x, bias=True))


def test_diffullama_logits_match_reference(ckpts):
    d, (W, c, ids) = ckpts["diffullama"]
    net, tok, cfg = load_pretrained(d, progress=False)
    assert (cfg.extra["family"], cfg.logit_shift, cfg.mask_id) == ("diffullama", True, 811)
    x = random_ids(cfg.vocab_size, seed=2)
    with torch.no_grad():
        assert_close(net(x), ref_qwen2_llama(W, c, x, bias=False))


@pytest.mark.parametrize("variant", ["diffugpt", "gpt2"])
def test_diffugpt_logits_match_reference(ckpts, variant):
    d, (W, c, ids, pre, wte) = ckpts[variant]
    net, tok, cfg = load_pretrained(d, progress=False)
    assert (cfg.arch, cfg.logit_shift, cfg.tie_embeddings) == ("gpt2", True, True)
    assert cfg.vocab_size == W[wte].shape[0]
    if variant == "diffugpt":
        assert cfg.mask_id == ids["[MASK]"]
    x = random_ids(cfg.vocab_size, seed=3)
    with torch.no_grad():
        assert_close(net(x), ref_gpt2(W, c, x, pre, wte))


def test_bd3lm_logits_match_reference_block_causal(ckpts):
    d, (W, c, ids) = ckpts["bd3lm"]
    net, tok, cfg = load_pretrained(d, progress=False)
    assert (cfg.arch, cfg.attention, cfg.block_length) == ("dit", "block_causal", 4)
    assert cfg.mask_id == c["vocab_size"] - 1
    x = random_ids(cfg.vocab_size, T=12, seed=4)
    allowed = block_causal(12, 4)
    ref = ref_ddit(W, c, x, allowed)
    with torch.no_grad():
        ours = net(x, t=torch.tensor([0.3, 0.9]), attn=DenseAttention(allowed[None, None]))
        assert_close(ours, ref)
        # Trained without time conditioning: the noise level the sampler passes changes nothing.
        assert torch.equal(ours, net(x, t=torch.zeros(2), attn=DenseAttention(allowed[None, None])))


@pytest.mark.parametrize("adaln", [True, False])
def test_mdlm_logits_match_reference_bidirectional(tmp_path, adaln):
    W, c, ids = make_bd3lm(tmp_path / "mdlm", model_type="mdlm", adaln=adaln)
    net, tok, cfg = load_pretrained(tmp_path / "mdlm", progress=False)
    assert (cfg.attention, cfg.time_conditioning) == ("full", adaln)
    x = random_ids(cfg.vocab_size, T=10, seed=5)
    if not adaln:  # no adaLN: plain pre-norm DDiT blocks (gates 1, no modulation)
        D, Cd = c["hidden_dim"], c["cond_dim"]
        for i in range(c["n_blocks"]):
            W[f"backbone.blocks.{i}.adaLN_modulation.weight"] = torch.zeros(6 * D, Cd)
            W[f"backbone.blocks.{i}.adaLN_modulation.bias"] = torch.tensor([0.0] * 2 * D + [1.0] * D
                                                                           + [0.0] * 2 * D + [1.0] * D)
        W |= {"backbone.sigma_map.mlp.0.weight": torch.zeros(Cd, 256),
              "backbone.sigma_map.mlp.0.bias": torch.zeros(Cd),
              "backbone.sigma_map.mlp.2.weight": torch.zeros(Cd, Cd),
              "backbone.sigma_map.mlp.2.bias": torch.zeros(Cd),
              "backbone.output_layer.adaLN_modulation.weight": torch.zeros(2 * D, Cd),
              "backbone.output_layer.adaLN_modulation.bias": torch.zeros(2 * D)}
    with torch.no_grad():
        assert_close(net(x), ref_ddit(W, c, x, None))


# --------------------------------------------------------------------------------------------
# files: shards, dtype, the embedded model's name, refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("maker", [make_dream, make_diffugpt])
def test_two_shards_with_index_equal_single_file(tmp_path, maker):
    maker(tmp_path / "one")
    maker(tmp_path / "two", shards=2)
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) == 2
    a, _, cfg_a = load_pretrained(tmp_path / "one", progress=False)
    b, _, cfg_b = load_pretrained(tmp_path / "two", progress=False)
    cfg_a.name = cfg_b.name
    assert cfg_a == cfg_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = random_ids(cfg_a.vocab_size, seed=6)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_bfloat16_load_converts_every_parameter_and_stays_close(ckpts):
    d, (W, c, ids) = ckpts["dream"]
    net, _, _ = load_pretrained(d, dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in net.parameters())
    x = random_ids(net.cfg.vocab_size, seed=7)
    with torch.no_grad():
        ref = ref_qwen2_llama(W, c, x, bias=True)
        err = (net(x).double() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item()  # bf16 weights: ~3 significant digits


def test_own_format_and_tiny_coder_name(tmp_path):
    from model.checkpoint import EMBEDDED_DIR, load_checkpoint, save_checkpoint
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer
    from model.transformer import DiffusionTransformer

    assert resolve_path("tiny-coder") == EMBEDDED_DIR
    tok = Tokenizer.train(TEXT, vocab_size=300)
    cfg = ModelConfig(name="own", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, mlp_hidden=64, max_seq_len=64)
    torch.manual_seed(0)
    src = DiffusionTransformer(cfg)
    save_checkpoint(tmp_path, src, tok)
    net, tok2, cfg2 = load_pretrained(tmp_path, progress=False)
    ref, _, _ = load_checkpoint(tmp_path)
    assert cfg2 == cfg and type(tok2).__name__ == "Tokenizer"
    assert family_defaults(cfg2).family == "tiny-coder"
    x = random_ids(cfg.vocab_size, seed=8)
    t = torch.rand(2)
    with torch.no_grad():
        assert torch.equal(net(x, t=t), ref(x, t=t))
    assert net.lm_head.weight is net.tok_embeddings.weight


def test_refuses_what_it_cannot_reproduce(tmp_path, ckpts):
    d, (W, c, ids) = ckpts["llada"]

    def variant(name, **changes):
        v = tmp_path / name
        v.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            (v / f).symlink_to(d / f)
        (v / "config.json").write_text(json.dumps(c | changes))
        return v

    with pytest.raises(FormatError, match="ALiBi"):
        load_pretrained(variant("alibi", alibi=True), progress=False)
    with pytest.raises(FormatError, match="not supported"):
        load_pretrained(variant("mamba", model_type="mamba"), progress=False)
    with pytest.raises(FormatError, match="QK layer norm"):
        load_pretrained(variant("qknorm", attention_layer_norm=True), progress=False)
    # A wrong shape rule (one layer more than stored) is caught, not silently random.
    with pytest.raises(FormatError, match="not in the checkpoint"):
        load_pretrained(variant("deeper", n_layers=3), progress=False)
    # Pickled weights are refused (loading them can run code).
    p = tmp_path / "pickle"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(c))
    (p / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FormatError, match="pickle"):
        load_pretrained(p, progress=False)


def test_unknown_tensor_is_an_error(tmp_path):
    W, c, ids = make_bd3lm(tmp_path / "x")
    W["backbone.blocks.0.extra_proj.weight"] = torch.zeros(2, 2)
    write_checkpoint(tmp_path / "x", c, W)
    with pytest.raises(FormatError, match="no place in the network"):
        load_pretrained(tmp_path / "x", progress=False)


def test_bd3lm_time_conditioned_and_causal_variants_are_refused(tmp_path):
    W, c, ids = make_bd3lm(tmp_path / "x")
    for change, msg in (({"time_conditioning": True}, "time_conditioning"),
                        ({"causal": True}, "autoregressive baseline")):
        (tmp_path / "x" / "config.json").write_text(json.dumps(c | change))
        with pytest.raises(FormatError, match=msg):
            load_pretrained(tmp_path / "x", progress=False)


# --------------------------------------------------------------------------------------------
# tensor parallelism
# --------------------------------------------------------------------------------------------
def _reassemble(parts: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    mod = ".".join(name.split(".")[2:-1]) if name.startswith("layers.") else ""
    kind = name.rsplit(".", 1)[1]
    if mod in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3", "mlp.fc"):
        return torch.cat([p[name] for p in parts], dim=0)
    if mod in ROW and kind == "weight":
        return torch.cat([p[name] for p in parts], dim=1)
    if mod in ROW and kind == "bias":  # rank 0 holds it, the others zeros: their sum is exact
        return sum(p[name] for p in parts)
    assert all(torch.equal(parts[0][name], p[name]) for p in parts)  # replicated
    return parts[0][name]


def _all_reduce_forward(nets, x):
    """Run the rank nets in threads; after each row-parallel layer their outputs are summed
    (what the NCCL all-reduce of model/parallel.py does across GPUs)."""
    n = len(nets)
    barrier, lock, outs, results = threading.Barrier(n), threading.Lock(), {}, [None] * n

    def hook_for(rank, name):
        def hook(module, args, out):
            with lock:
                outs.setdefault(name, [None] * n)[rank] = out
            barrier.wait()
            total = sum(outs[name])
            barrier.wait()
            return total
        return hook

    handles = []
    for r, net in enumerate(nets):
        for name, m in net.named_modules():
            if any(name.endswith(row) for row in ROW):
                handles.append(m.register_forward_hook(hook_for(r, name)))

    def run(r):
        with torch.no_grad():
            results[r] = nets[r](x)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.remove()
    return results


@pytest.mark.parametrize("fmt", ["dream", "diffugpt"])
def test_tensor_parallel_slices_reassemble_and_give_the_same_logits(ckpts, fmt):
    d = ckpts[fmt][0]
    full, _, cfg = load_pretrained(d, progress=False)
    ranks = [load_pretrained(d, tp_rank=r, tp_size=2, progress=False)[0] for r in range(2)]
    parts = [r.state_dict() for r in ranks]
    ref = full.state_dict()
    for name, t in ref.items():
        assert torch.equal(_reassemble(parts, name), t), name
    # Each rank holds half of the sharded matrices, and its modules say so.
    assert parts[0]["layers.0.attn.wq.weight"].shape[0] == ref["layers.0.attn.wq.weight"].shape[0] // 2
    assert ranks[0].layers[0].attn.n_heads == cfg.n_heads // 2
    x = random_ids(cfg.vocab_size, seed=9)
    with torch.no_grad():
        want = full(x)
    for got in _all_reduce_forward(ranks, x):
        assert (got - want).abs().max().item() < 1e-4


@pytest.mark.slow
def test_tensor_parallel_through_model_parallel_equals_unsharded(ckpts):
    """The real path: two gloo processes, load_pretrained slices + apply_tp's all-reduces."""
    parallel = pytest.importorskip("model.parallel")
    d = ckpts["diffugpt"][0]
    full, _, cfg = load_pretrained(d, progress=False)
    x = random_ids(cfg.vocab_size, seed=10)
    with torch.no_grad():
        want = full(x)
    got = parallel.tp_forward(d, x, tensor_parallel=2)
    assert (got - want).abs().max().item() < 1e-4


def test_tensor_parallel_rejects_uneven_heads(ckpts):
    # 3 ranks split neither the heads nor the 2 KV heads (4 ranks would replicate each KV head
    # twice, model/loaders/tp.replicate_kv_heads, as LLaDA2.0-flash's 4 KV heads over 8 GPUs)
    with pytest.raises(ValueError, match="divisible"):
        load_pretrained(ckpts["dream"][0], tp_rank=0, tp_size=3, progress=False)


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
def test_checkpoint_python_files_never_run(ckpts):
    for d, _ in ckpts.values():
        load_pretrained(d, progress=False)
        assert not list(d.glob("*.RAN")), f"code from {d} was executed"


def test_llada_chat_template_and_special_ids(ckpts):
    d, (W, c, ids) = ckpts["llada"]
    _, tok, cfg = load_pretrained(d, progress=False)
    msgs = [{"role": "user", "content": "  Hello <|eot_id|> world  "}]
    out = tok.chat_prompt(msgs)
    enc = tok.encode
    want = ([ids["<|startoftext|>"], ids["<|start_header_id|>"]] + enc("user")
            + [ids["<|end_header_id|>"]] + enc("\n\nHello <|eot_id|> world") + [ids["<|eot_id|>"]]
            + [ids["<|start_header_id|>"]] + enc("assistant") + [ids["<|end_header_id|>"]]
            + enc("\n\n"))
    assert out == want
    # The user's "<|eot_id|>" is text: only the template's own end-of-turn is a control token.
    assert out.count(ids["<|eot_id|>"]) == 1
    assert (tok.mask_id, tok.eos_id, tok.eot_id) == (cfg.mask_id, cfg.eos_id, cfg.eot_id)
    text = "def add(a, b): return a + b"
    assert tok.decode(enc(text)) == text
    assert tok.decode([ids["<|eot_id|>"]] + enc(text) + [tok.eos_id, tok.mask_id]) == text
    assert tok.decode(enc(text) + [cfg.vocab_size - 1]) == text  # embedding padding rows: no text
    with pytest.raises(NoFimFormat, match="suffix after the canvas"):
        tok.fim_prompt("def f(", "):")


def test_dream_tokenizer_from_vocab_and_merges_without_its_code(ckpts):
    d, (W, c, ids) = ckpts["dream"]
    assert not (d / "tokenizer.json").exists()
    _, tok, cfg = load_pretrained(d, progress=False)
    out = tok.chat_prompt([{"role": "user", "content": "hi"}])
    assert out[:1] == [ids["<|im_start|>"]] and out.count(ids["<|im_end|>"]) == 2
    assert out[-len(tok.encode("assistant\n")):] == tok.encode("assistant\n")
    assert tok.eot_id == ids["<|im_end|>"] and tok.mask_id == ids["<|mask|>"]


def test_base_models_have_no_chat_template_but_complete_with_bos(ckpts):
    d, (W, c, ids) = ckpts["diffullama"]
    _, tok, cfg = load_pretrained(d, progress=False)
    with pytest.raises(NoChatTemplate):
        tok.chat_prompt([{"role": "user", "content": "hi"}])
    assert tok.encode("hello")[0] != ids["<s>"]  # encode adds nothing
    assert tok.completion_prompt("hello") == [ids["<s>"]] + tok.encode("hello")


# --------------------------------------------------------------------------------------------
# families and sampling on loaded models
# --------------------------------------------------------------------------------------------
def test_family_defaults_build_valid_sampling_params(ckpts):
    seen = {}
    for name, (d, _) in ckpts.items():
        _, _, cfg = load_pretrained(d, progress=False)
        fam = family_defaults(cfg)
        seen[name] = fam
        SamplingParams(**fam.sampling_kwargs(max_new_tokens=64)).validate()
    llada = seen["llada"]
    assert llada.sampling_kwargs(128) | {} == dict(
        max_new_tokens=128, block_length=32, steps=32, remasking="low_confidence",
        temperature=0.0, top_p=1.0, suppress_token_ids=[], defer_token_ids=[])
    on = llada.with_options(logits_eos_inf=True, confidence_eos_eot_inf=True)
    eos, eot = ckpts["llada"][1][2]["<|endoftext|>"], ckpts["llada"][1][2]["<|eot_id|>"]
    # confidence_eos_eot_inf is LLaDA's exact rule (tests/model/test_dream_exact.py pins it)
    assert on.suppress_token_ids == (eos,) and set(on.confidence_inf_token_ids) == {eos, eot}
    assert on.sampling_kwargs(32)["confidence_inf_token_ids"] == list(on.confidence_inf_token_ids)
    assert seen["dream"].sampling_kwargs(100)["block_length"] == 100  # whole canvas
    assert seen["bd3lm"].sampling_kwargs(100)["block_length"] == 4


def test_tiny_coder_defers_eos_and_eot_by_default():
    from model.checkpoint import EMBEDDED_DIR
    from model.config import ModelConfig

    cfg = ModelConfig.load(EMBEDDED_DIR)
    kw = family_defaults(cfg).sampling_kwargs(64)
    assert kw["defer_token_ids"] == [cfg.eos_id, cfg.eot_id]
    assert kw["suppress_token_ids"] == []  # EOS still ends answers, after the block's content


@pytest.mark.parametrize("fmt", ["llada", "dream", "bd3lm"])
def test_generate_runs_on_loaded_models(ckpts, fmt):
    d = ckpts[fmt][0]
    net, tok, cfg = load_pretrained(d, progress=False)
    params = SamplingParams(**(family_defaults(cfg).sampling_kwargs(8) | {"temperature": 0.0}))
    out = generate(net, tok.encode("def add(a, b):"), params, tokenizer=tok)
    assert 1 <= len(out.tokens) <= 8 and cfg.mask_id not in out.tokens
    assert all(0 <= t < cfg.vocab_size for t in out.tokens)
