"""`dllm generate` prints the same completion whatever the tensor-parallel degree.

The TP path once had its own copy of the command's body without token healing: a prompt ending
in whitespace ("class Point:\\n") printed nothing at --tensor-parallel 2 while TP 1 printed code.
Prompts ending in whitespace are the ones healing changes, so they are the ones pinned here.
TP 2 spawns two gloo processes per call, so the prompts are few and short.
"""

import pytest

from model.cli_generate import main

PROMPTS = ["class Point:\n", "def f(x):\n    ", "def parse(s):"]


def _printed(capsys, argv: list[str]) -> str:
    main(argv)
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tensor_parallel_2_prints_what_tp_1_prints(prompt, capsys):
    argv = ["--model", "tiny-coder", "--prompt", prompt, "--max-tokens", "32",
            "--temperature", "0"]
    tp1 = _printed(capsys, argv)
    tp2 = _printed(capsys, argv + ["--tensor-parallel", "2"])
    assert tp1.strip(), f"TP 1 printed no completion for {prompt!r}"
    assert tp2 == tp1


def test_healed_prompt_is_not_printed_twice(capsys):
    """Healing moves the prompt's trailing "\\n" into the completion; the printed text is what
    follows the prompt the user typed, so it does not start with that newline again."""
    out = _printed(capsys, ["--prompt", "class Point:\n", "--max-tokens", "16"])
    assert out.strip() and not out.startswith("\n")


def test_show_steps_reports_the_steps_taken(capsys):
    out = _printed(capsys, ["--prompt", "x = ", "--max-tokens", "16", "--steps", "4",
                            "--block-length", "8", "--show-steps"])
    frames = [line for line in out.splitlines() if line.startswith("-- block ")]
    done = [line for line in out.splitlines() if line.startswith("-- done: ")]
    assert len(done) == 1
    steps = int(done[0].split()[2])
    assert len(frames) == steps and 0 < steps <= 2 * 4  # two blocks of 8, at most 4 steps each


def test_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--prompt", "x", "--dtype", "float64"])
