import json

import pytest

from benchmarks.quality import (
    cut_function_body,
    edit_similarity,
    fim_cases,
    line_parses,
    parse_cases,
    parses,
)
from benchmarks.quality import main as eval_main
from model.checkpoint import save_checkpoint

from .conftest import tiny_config, tiny_net


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("", "xy") == 0.0


def test_a_line_parses_when_it_is_a_statement_on_its_own():
    # what the model writes at 32 steps per block, and at 2 (the same edit similarity)
    assert line_parses("    def __init__(self, key: str) -> bool:\n")
    assert not line_parses("    def __(self,,")
    assert line_parses("        nprefix = len(prefix)")
    assert not line_parses("    return self.get(self.get_from_to_to")  # cut before its `)`
    assert not line_parses("    ) -> Callable[[bytes], object]: ...")  # a continuation line
    assert not line_parses("        # a comment") and not line_parses("   ")


def test_cut_function_body_stops_at_dedent():
    text = "    return x\n\n    y = 2\nclass A:\n    pass\n"
    assert cut_function_body(text, 0) == "    return x\n\n    y = 2\n"


def test_cases_are_whole_lines_with_context(small_tokenizer, toy_files):
    cases = fim_cases(small_tokenizer, toy_files, 10)
    assert len(cases) == 10
    for c in cases:
        assert c.middle.endswith("\n") and c.middle.count("\n") == 1 and c.middle.strip()
        assert len(small_tokenizer.encode(c.prefix)) <= 256 + 2
    pcs = parse_cases(toy_files, 5)
    assert pcs and all(parses(c.before + " " * (c.indent + 4) + "pass\n" + c.after) for c in pcs)


def test_eval_runs_on_a_small_slice(tmp_path, small_tokenizer, toy_files):
    model_dir = tmp_path / "model"
    save_checkpoint(model_dir, tiny_net(tiny_config(small_tokenizer, max_seq_len=1024)),
                    small_tokenizer)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in toy_files.items():
        (corpus / name.replace("/", "_")).write_text(text)
    out = tmp_path / "quality.json"
    eval_main(["--model", str(model_dir), "--corpus", str(corpus), "--fim-cases", "3",
               "--parse-cases", "2", "--steps", "1", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["steps_per_block"] for r in result["rows"]] == [1, 4]
    for r in result["rows"] + [result["autoregressive"]]:
        assert r["fim_cases"] == 3 and r["parse_cases"] == 2
        assert 0 <= r["fim_exact_match"] <= 1 and 0 <= r["parse_rate"] <= 1
        assert 0 <= r["fim_line_parse_rate"] <= 1 and r["fim_statement_cases"] <= 3
    assert out.with_suffix(".png").stat().st_size > 1000
