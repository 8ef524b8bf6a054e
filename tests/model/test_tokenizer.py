from model.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_special_tokens_take_the_first_ids(small_tokenizer):
    tok = small_tokenizer
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.mask_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_round_trip_is_exact(small_tokenizer, toy_files):
    tok = small_tokenizer
    samples = list(toy_files.values())[:3] + [
        "", " ", "\n\n\t  x", "naïve café — 日本語 🐍\r\n", "\x00\x7f", "<|mask|> is text here",
        "def f():\n    return '<|endoftext|>'\n",
    ]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text


def test_user_text_never_becomes_control_tokens(small_tokenizer):
    tok = small_tokenizer
    ids = tok.encode("a<|endoftext|>b<|mask|>")
    assert tok.eos_id not in ids and tok.mask_id not in ids


def test_fim_and_chat_formats(small_tokenizer):
    tok = small_tokenizer
    ids = tok.fim_prompt("x = 1\n", "\nprint(x)\n")
    assert ids[0] == tok.fim_prefix_id and ids[-1] == tok.fim_middle_id
    assert tok.fim_suffix_id in ids
    chat = tok.chat_prompt([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hi"}])
    assert chat[0] == tok.role_ids["system"] and chat[-1] == tok.role_ids["assistant"]
    assert chat.count(tok.eot_id) == 2


def test_save_load(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "for i in range(10):\n    print(i)\n"
    assert again.encode(text) == small_tokenizer.encode(text)
