"""Token healing at the prompt boundary.

    ids, healed_text, allowed = heal_prompt(tokenizer, ids)
    params.first_token_ids = allowed     # the first generated token must start with healed_text
    text = completion_text[len(healed_text):]

Why: byte-level BPE merges a newline with the indentation after it ("\\n    " is one token), so a
prompt that ends in a bare "\\n" ends in a token the model almost only saw before a column-0
line or at the end of a file. tiny-coder then predicts end-of-text at once and the user gets an
empty completion. Backing off a trailing whitespace token and constraining the first generated
position to tokens that start with the removed text lets the model choose "\\n    return" itself.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=8)
def _vocab_strings(tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.decode([i], skip_special=False) for i in range(tokenizer.vocab_size))


def heal_prompt(tokenizer, prompt_ids: list[int]) -> tuple[list[int], str, list[int] | None]:
    """-> (prompt ids without a trailing whitespace token, the removed text, allowed first ids).
    Prompts that do not end in whitespace come back unchanged with allowed = None."""
    if len(prompt_ids) < 2:
        return prompt_ids, "", None
    last = prompt_ids[-1]
    if last in getattr(tokenizer, "special_ids", ()):
        return prompt_ids, "", None
    text = tokenizer.decode([last], skip_special=False)
    if not text or text.strip() or "\ufffd" in text:
        return prompt_ids, "", None
    vocab = _vocab_strings(tokenizer)
    allowed = [i for i, s in enumerate(vocab) if s.startswith(text) and i not in tokenizer.special_ids]
    if not allowed:
        return prompt_ids, "", None
    return prompt_ids[:-1], text, allowed
