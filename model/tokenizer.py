"""Byte-level BPE tokenizer for the embedded model, with the special tokens diffusion serving needs.

    tok = Tokenizer.train(paths, vocab_size=8192)   # from Python source files
    tok.save(out_dir); tok = Tokenizer.load(out_dir)
    ids = tok.encode(text); assert tok.decode(ids) == text   # exact round trip

Special tokens take the first ids so that a config can name them without reading the file:
mask 0, end-of-text 1, pad 2, FIM prefix/suffix/middle 3-5, chat roles 6-8, end of turn 9.
Byte-level pre-tokenisation with no normaliser makes any string (any bytes of UTF-8) round-trip.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"

MASK = "<|mask|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end_of_turn|>"
SPECIAL_TOKENS = [MASK, EOS, PAD, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, SYSTEM, USER, ASSISTANT,
                  END_OF_TURN]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class Tokenizer:
    """Thin wrapper over a `tokenizers` BPE with the ids and formats the samplers use."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.mask_id = ids[MASK]
        self.eos_id = ids[EOS]
        self.pad_id = ids[PAD]
        self.fim_prefix_id = ids[FIM_PREFIX]
        self.fim_suffix_id = ids[FIM_SUFFIX]
        self.fim_middle_id = ids[FIM_MIDDLE]
        self.eot_id = ids[END_OF_TURN]
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.special_ids = frozenset(ids.values())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    # --- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # Special-token strings typed by a user are plain text, never control tokens.
        return self.hf.encode(text, add_special_tokens=False, is_pretokenized=False).ids \
            if not any(s in text for s in SPECIAL_TOKENS) else self._encode_literal(text)

    def _encode_literal(self, text: str) -> list[int]:
        # Split around special-token strings and encode them byte by byte (so they stay text).
        out: list[int] = []
        for piece in _split_keep(text, SPECIAL_TOKENS):
            if piece in SPECIAL_TOKENS:
                for ch in piece:
                    out.extend(self.hf.encode(ch, add_special_tokens=False).ids)
            elif piece:
                out.extend(self.hf.encode(piece, add_special_tokens=False).ids)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_str(self, i: int) -> str:
        return self.hf.id_to_token(int(i)) or ""

    # --- prompt formats -------------------------------------------------------------------
    def completion_prompt(self, text: str) -> list[int]:
        """A raw-text prompt. tiny-coder has no BOS; HF tokenizers add theirs here."""
        return self.encode(text)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """PSM order (prefix, suffix, middle), the format tiny-coder is trained on."""
        return ([self.fim_prefix_id] + self.encode(prefix) + [self.fim_suffix_id]
                + self.encode(suffix) + [self.fim_middle_id])

    def chat_prompt(self, messages: Iterable[dict], add_generation_prompt: bool = True) -> list[int]:
        """<|user|>text<|end_of_turn|>...<|assistant|>: the chat format tiny-coder is trained on."""
        ids: list[int] = []
        for m in messages:
            role = m["role"]
            if role not in self.role_ids:
                raise ValueError(f"unknown chat role {role!r}")
            ids += [self.role_ids[role]] + self.encode(m["content"]) + [self.eot_id]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        return ids

    # --- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=True,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        log.info("trained byte-level BPE with %d tokens", hf.get_vocab_size())
        return cls(hf)


def _split_keep(text: str, seps: Sequence[str]) -> list[str]:
    out, i, start = [], 0, 0
    while i < len(text):
        for s in seps:
            if text.startswith(s, i):
                out += [text[start:i], s]
                i += len(s)
                start = i
                break
        else:
            i += 1
    out.append(text[start:])
    return out
