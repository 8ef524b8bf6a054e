"""Training data for tiny-coder: Python source, split by path hash, turned into three kinds of
examples the server will be asked for.

    files = python_corpus()                  # {relative path: source}, default = this stdlib
    train, held_out = split_files(files)     # stable: a file's side depends on its path only
    batch = ExampleSampler(tok, train_files, ...).batch(kind, batch_size, block_length)

Kinds of example (prompt | response):
- plain: a window of the token stream, with a random prompt length so that blocks start at
  every offset (at inference the canvas starts wherever the prompt ends);
- fim: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> | middle <eos>..., the middle being
  1-3 whole lines (the shape of `dllm eval`'s FIM cases) or a random character span;
- chat: <user> signature + docstring <end_of_turn> <assistant> | function source <end_of_turn>.
Responses are filled with EOS to the end of their block (the sampler stops after a block that
holds EOS, and the positions after EOS in that block must learn to be EOS) and then PAD, which the
loss ignores.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_corpus(root: str | Path | None = None, max_bytes: int = 200_000) -> dict[str, str]:
    """All .py files under root (default: the running interpreter's standard library, without
    site-packages), keyed by path relative to root. Huge generated files are skipped."""
    root = Path(root) if root else stdlib_dir()
    files = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            if p.stat().st_size > max_bytes:
                continue
            files[rel] = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return files


def is_held_out(rel_path: str, held_out_percent: int = 3) -> bool:
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100 < held_out_percent


def split_files(files: dict[str, str], held_out_percent: int = 3):
    held_keys = {k for k in files if is_held_out(k, held_out_percent)}
    if not held_keys and len(files) > 1:  # tiny corpora (tests): hold out the lowest-hash file
        held_keys = {min(files, key=lambda k: hashlib.sha1(k.encode()).hexdigest())}
    train = {k: v for k, v in files.items() if k not in held_keys}
    held = {k: v for k, v in files.items() if k in held_keys}
    return train, held


def documented_functions(source: str, max_chars: int = 1500) -> list[tuple[str, str]]:
    """(signature + docstring, whole function source) for each documented top-level or method def."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc or not node.body or node.end_lineno is None:
            continue
        src = "".join(lines[node.lineno - 1:node.end_lineno])
        if len(src) > max_chars or len(node.body) < 2:
            continue
        body_start = node.body[1].lineno - 1  # first statement after the docstring
        head = "".join(lines[node.lineno - 1:body_start])
        out.append((head, src))
    return out


@dataclass
class Batch:
    ids: torch.Tensor         # [B, L] clean tokens
    prompt_len: torch.Tensor  # [B]
    loss_mask: torch.Tensor   # [B, L] False on PAD
    block_length: int
    kind: str


class ExampleSampler:
    def __init__(self, tok: Tokenizer, files: dict[str, str], seq_len: int = 384,
                 fim_context: int = 256, seed: int = 0):
        self.tok, self.seq_len, self.fim_context = tok, seq_len, fim_context
        self.rng = random.Random(seed)
        self.texts = [t for t in files.values() if t.strip()]
        stream: list[int] = []
        for text in tqdm(self.texts, desc="tokenizing corpus", unit="file", leave=False):
            stream += tok.encode(text) + [tok.eos_id]
        self.stream = torch.tensor(stream, dtype=torch.int32)
        self.functions = [f for t in self.texts for f in documented_functions(t)]
        log.info("corpus: %d files, %d tokens, %d documented functions", len(self.texts),
                 len(self.stream), len(self.functions))

    # --- single examples -> (prompt ids, response ids) ------------------------------------
    def plain(self) -> tuple[list[int], list[int]]:
        L = min(self.seq_len, len(self.stream) - 1)
        if L < 2:
            raise ValueError("corpus too small for training examples")
        start = self.rng.randrange(0, len(self.stream) - L)
        window = self.stream[start:start + L].tolist()
        p = self.rng.randrange(0, L // 2)
        return window[:p], window[p:]

    def fim(self) -> tuple[list[int], list[int]]:
        text = self.rng.choice(self.texts)
        lines = text.splitlines(keepends=True)
        if len(lines) < 4:
            return self.plain()
        if self.rng.random() < 0.8:  # whole lines: the shape of the eval's FIM cases
            i = self.rng.randrange(1, len(lines) - 1)
            n = min(self.rng.choice([1, 1, 1, 2, 3]), len(lines) - i)
            prefix, middle, suffix = "".join(lines[:i]), "".join(lines[i:i + n]), "".join(lines[i + n:])
        else:  # a random span inside the text
            a = self.rng.randrange(0, len(text) - 1)
            b = min(len(text), a + self.rng.randrange(1, 120))
            prefix, middle, suffix = text[:a], text[a:b], text[b:]
        ctx_p = self.rng.randrange(16, self.fim_context + 1)
        ctx_s = self.rng.randrange(16, self.fim_context + 1)
        # Slice text first (4 chars/token is generous) so tokenising stays cheap.
        pre = self.tok.encode(prefix[-ctx_p * 6:])[-ctx_p:]
        suf = self.tok.encode(suffix[:ctx_s * 6])[:ctx_s]
        mid = self.tok.encode(middle)[:64]
        t = self.tok
        prompt = [t.fim_prefix_id] + pre + [t.fim_suffix_id] + suf + [t.fim_middle_id]
        return prompt, mid + [t.eos_id]

    def chat(self) -> tuple[list[int], list[int]]:
        if not self.functions:
            return self.plain()
        head, src = self.rng.choice(self.functions)
        ask = self.rng.choice(["Write this Python function:\n", "Implement:\n", "Complete the function.\n", ""])
        prompt = self.tok.chat_prompt([{"role": "user", "content": ask + head}])
        return prompt, self.tok.encode(src)[:256] + [self.tok.eot_id, self.tok.eos_id]

    # --- batches ---------------------------------------------------------------------------
    def batch(self, kind: str, batch_size: int, block_length: int) -> Batch:
        make = {"plain": self.plain, "fim": self.fim, "chat": self.chat}[kind]
        examples = [make() for _ in range(batch_size)]
        rows, plens = [], []
        for prompt, resp in examples:
            if kind != "plain":
                # EOS-fill to the end of the block holding the last response token
                n = len(resp)
                resp = resp + [self.tok.eos_id] * ((-n) % block_length)
            rows.append(prompt + resp)
            plens.append(len(prompt))
        L = max(len(r) for r in rows)
        ids = torch.full((batch_size, L), self.tok.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(batch_size, L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            loss_mask[i, :len(r)] = True
        return Batch(ids, torch.tensor(plens), loss_mask, block_length, kind)
