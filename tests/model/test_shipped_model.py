"""The embedded tiny-coder: in the repo, within its size cap, and able to complete code."""

from model.checkpoint import EMBEDDED_DIR, load_checkpoint
from model.healing import heal_prompt
from model.sampling import SamplingParams, generate


def test_files_and_size_cap():
    names = {"config.json", "tokenizer.json", "model.safetensors"}
    assert names <= {p.name for p in EMBEDDED_DIR.iterdir()}
    total = sum((EMBEDDED_DIR / n).stat().st_size for n in names)
    assert total <= 24 * 1024 * 1024


def test_block_causal_with_time_conditioning():
    net, tok, cfg = load_checkpoint(EMBEDDED_DIR)
    assert cfg.attention == "block_causal" and cfg.time_conditioning
    assert tok.vocab_size == cfg.vocab_size and tok.mask_id == cfg.mask_id


def test_completes_code_as_text():
    """A prompt ending in a newline (the usual case) is healed and gets a non-empty body."""
    net, tok, cfg = load_checkpoint(EMBEDDED_DIR)
    prompt = "class Point:\n"
    ids, healed, allowed = heal_prompt(tok, tok.encode(prompt))
    assert healed == "\n"
    r = generate(net, ids, SamplingParams(max_new_tokens=64, steps=8, first_token_ids=allowed),
                 tokenizer=tok)
    assert r.text.startswith("\n") and r.text[1:].strip()
    assert cfg.mask_id not in r.tokens and r.steps <= 16


def test_fim_prompt_is_served():
    """Fill in the middle: what a user gets is a non-empty middle that the model ends itself
    (end of text inside the first block, not the token budget), free of special tokens, which
    joins prefix and suffix into a file Python can parse; the steps reported are the 8 of the
    one block denoised."""
    net, tok, cfg = load_checkpoint(EMBEDDED_DIR)
    prefix, suffix = "x = [1, 2, 3]\n", "\nprint(total)\n"
    r = generate(net, tok.fim_prompt(prefix, suffix), SamplingParams(max_new_tokens=32, steps=8),
                 tokenizer=tok)
    assert r.text, "empty middle"
    assert r.finish_reason == "stop" and r.tokens[-1] == cfg.eos_id
    special = {cfg.mask_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id}
    assert not special & set(r.tokens)
    compile(prefix + r.text + suffix, "<fim>", "exec")  # SyntaxError fails the test
    assert r.blocks == 1 and r.steps == 8
