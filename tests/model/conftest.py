"""Fixtures for model tests: a small tokenizer and tiny random networks (seconds, not minutes)."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.data import python_corpus, stdlib_dir
from model.tokenizer import Tokenizer
from model.transformer import DiffusionTransformer


@pytest.fixture(scope="session")
def toy_files() -> dict[str, str]:
    """A small real corpus: the stdlib's json package."""
    return python_corpus(stdlib_dir() / "json")


@pytest.fixture(scope="session")
def small_tokenizer(toy_files) -> Tokenizer:
    return Tokenizer.train(toy_files.values(), vocab_size=400)


def tiny_config(tok: Tokenizer | None = None, **overrides) -> ModelConfig:
    base = dict(name="test-tiny", vocab_size=tok.vocab_size if tok else 300, d_model=64,
                n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128, max_seq_len=512)
    if tok is not None:
        base.update(mask_id=tok.mask_id, eos_id=tok.eos_id, pad_id=tok.pad_id, eot_id=tok.eot_id)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_net(cfg: ModelConfig, seed: int = 0) -> DiffusionTransformer:
    """A random net whose adaLN weights are non-zero, so time conditioning really matters."""
    torch.manual_seed(seed)
    net = DiffusionTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()
