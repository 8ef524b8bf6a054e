"""A published checkpoint's tokenizer behind the interface of model/tokenizer.py's Tokenizer.

    raw = load_hf_tokenizer("ckpt/LLaDA-8B-Instruct")           # transformers, no remote code
    tok = HFTokenizer(raw, mask_id=126336, eos_id=126081, eot_id=126348)
    ids = tok.chat_prompt([{"role": "user", "content": "hi"}])  # the checkpoint's chat_template
    text = tok.decode(generated_ids)                            # special tokens dropped

The samplers and the server only use encode / decode / chat_prompt / fim_prompt and the special
ids, so a LLaDA or Dream tokenizer drops in where tiny-coder's Tokenizer was. Loading goes through
transformers' tokenizers-backed classes by name (never AutoTokenizer with trust_remote_code: the
`auto_map` of Dream's tokenizer_config points at Python code shipped with the download, which we
do not run). Text a user types is always text: special-token strings inside messages or prompts
are encoded as ordinary characters, so only the chat template writes control tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Tokenizer classes by the name a format module gives, for checkpoints that ship vocab.json +
# merges.txt (Dream, GPT-2) or tokenizer.model (Llama) instead of a tokenizer.json.
_CLASSES = {"qwen2": "Qwen2Tokenizer", "gpt2": "GPT2Tokenizer", "llama": "LlamaTokenizer"}


class NoFimFormat(ValueError):
    """The model was not trained with fill-in-the-middle sentinel tokens."""


class NoChatTemplate(ValueError):
    """The checkpoint has no chat template (a base model)."""


def load_hf_tokenizer(directory: str | Path, fallback: str | None = None):
    """transformers tokenizer from `directory`: tokenizer.json if present, else the named
    `fallback` class ("qwen2", "gpt2", "llama") over vocab.json+merges.txt / tokenizer.model."""
    import transformers

    d = Path(directory)
    if (d / "tokenizer.json").exists():
        cls = transformers.PreTrainedTokenizerFast
    elif fallback in _CLASSES and any((d / f).exists() for f in
                                      ("vocab.json", "merges.txt", "tokenizer.model")):
        cls = getattr(transformers, _CLASSES[fallback])
    else:
        raise FileNotFoundError(
            f"no tokenizer in {d}: expected tokenizer.json"
            + (f" or the files of a {_CLASSES[fallback]}" if fallback in _CLASSES else "")
            + " (checkpoints published without one, like BD3-LM's, use the base model's "
              "tokenizer: copy its tokenizer files into the directory)")
    # local_files_only: a model directory is loaded as it is, never completed from the network.
    return cls.from_pretrained(str(d), local_files_only=True)


class HFTokenizer:
    """Wraps a transformers tokenizer with the special ids the samplers need."""

    def __init__(self, tok, *, mask_id: int, eos_id: int, pad_id: int | None = None,
                 eot_id: int | None = None, name: str = ""):
        self.hf = tok
        self.name = name
        self.mask_id = int(mask_id)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        self.eot_id = int(eot_id) if eot_id is not None else None
        self.bos_id = tok.bos_token_id
        # Does the tokenizer start documents with BOS? Llama's tokenizer.json says so in its
        # post-processor, a LlamaTokenizer in add_bos_token: ask the tokenizer itself.
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id \
            and tok("a", add_special_tokens=False)["input_ids"][:1] != [self.bos_id]
        self.fim_prefix_id = self.fim_suffix_id = self.fim_middle_id = None
        ids = {self.mask_id, self.eos_id, self.pad_id}
        ids.update(int(i) for i in tok.all_special_ids if i is not None)
        # Added tokens marked special (chat headers, <|mdm_mask|>, <|im_end|>): never shown as text.
        for i, added in getattr(tok, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                ids.add(int(i))
        if self.eot_id is not None:
            ids.add(self.eot_id)
        self.special_ids = frozenset(ids)
        self._n = len(tok)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can decode (the model's embedding may have unused rows beyond)."""
        return self._n

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    # --- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids: no BOS added, special-token strings encoded as characters."""
        return list(self.hf(text, add_special_tokens=False,
                            split_special_tokens=True)["input_ids"])

    def completion_prompt(self, text: str) -> list[int]:
        """A raw-text prompt as the model saw documents in training: BOS first when the
        tokenizer adds one (Llama, LLaDA), then the text."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.adds_bos else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        # Ids past the tokenizer (padding rows of the embedding) have no text at all.
        ids = [i for i in ids if 0 <= i < self._n]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_str(self, i: int) -> str:
        return self.hf.convert_ids_to_tokens(int(i)) or ""

    # --- prompt formats -------------------------------------------------------------------
    def chat_prompt(self, messages: Iterable[dict], add_generation_prompt: bool = True) -> list[int]:
        """The checkpoint's own chat_template (jinja), rendered by transformers."""
        if not self.has_chat_template:
            raise NoChatTemplate(f"{self.name or 'this model'} has no chat template (a base "
                                 "model); send a completion prompt instead")
        msgs = []
        for m in messages:
            if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise ValueError("chat messages need a string 'role' and 'content'")
            msgs.append({"role": m["role"], "content": m["content"]})
        ids = self.hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, return_dict=False,
                                          sanitize_control_tokens=True)
        return [int(i) for i in ids]

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        raise NoFimFormat(
            f"{self.name or 'this model'} has no fill-in-the-middle prompt format; for a "
            "full-attention model pass the suffix after the canvas instead "
            "(model.sampling.generate(..., suffix_ids=tok.encode(suffix)))")

    # --- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        self.hf.save_pretrained(str(directory))
        return Path(directory)

    def token_id(self, token: str) -> int | None:
        """Id of a token string if it is one token of the vocabulary, else None."""
        i = self.hf.convert_tokens_to_ids(token)
        unk = self.hf.unk_token_id
        return None if i is None or (unk is not None and i == unk and token != self.hf.unk_token) \
            else int(i)
