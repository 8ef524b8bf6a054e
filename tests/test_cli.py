"""The `dllm` entry point: the OpenMP wait policy it chooses before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import os, sys, dllm_cli; dllm_cli.quiet_openmp_workers(sys.argv[1], sys.argv[2:]); "
         "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")


def policy(*argv: str, env: dict | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env={**base, **(env or {})},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("argv", [("bench", "engine"), ("generate", "--prompt", "x"), ("eval",),
                                  ("bench", "burst")])
def test_engine_commands_get_passive_openmp_workers(argv):
    assert policy(*argv) == "PASSIVE"


@pytest.mark.parametrize("argv", [("train", "--max-steps", "1"), ("bench", "train")])
def test_training_keeps_the_libgomp_default(argv):
    assert policy(*argv) == "unset"


def test_a_policy_the_caller_set_is_kept():
    assert policy("bench", "engine", env={"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_the_policy_is_set_before_torch_loads():
    # libgomp reads OMP_WAIT_POLICY once, when torch's import loads it
    src = (REPO / "dllm_cli.py").read_text()
    assert "import torch" not in src.split("def quiet_openmp_workers")[0]
