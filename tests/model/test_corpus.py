"""The training corpus: which licences pass, what a package contributes, de-duplication."""

import importlib.metadata as md

import pytest

from model.corpus import code_corpus, dedupe, is_permissive, package_files


@pytest.mark.parametrize("licence, ok", [
    ("MIT", True), ("BSD-3-Clause", True), ("Apache-2.0 OR BSD-2-Clause", True),
    ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND BSL-1.0 AND MIT", True),
    ("LGPL-3.0 OR MIT", True),            # MIT may be chosen
    ("MPL-2.0 AND MIT", False),           # MPL is required
    ("GPLv2", False), ("", False), ("UNKNOWN", False), ("Proprietary", False),
])
def test_licences(licence, ok):
    assert is_permissive(licence) is ok


def _fake_dist(root, name, licence, files: dict[str, str]):
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n"
                                   f"License-Expression: {licence}\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))
    return md.PathDistribution(info)


def test_package_files_skips_tests_vendored_generated_and_caps(tmp_path):
    code = "def f(x):\n    return x + 1\n"
    dist = _fake_dist(tmp_path, "pkg", "MIT", {
        "pkg/core.py": code,
        "pkg/util.py": "def g():\n    return 2\n" * 50,
        "pkg/tests/test_core.py": "def test_f():\n    assert 1\n",
        "pkg/conftest.py": "import pytest\n",
        "pkg/_vendor/six.py": "x = 1\n",
        "pkg/api_pb2.py": "# proto\n",
        "pkg/gen.py": "# This file is auto-generated. Do not edit.\nX = 1\n",
        "pkg/empty.py": "\n",
    })
    files, src = package_files(dist, max_package_bytes=10_000)
    assert set(files) == {"pkg/pkg/core.py", "pkg/pkg/util.py"}
    assert files["pkg/pkg/core.py"] == code
    assert src.skipped == {"tests": 2, "vendored": 1, "generated": 2, "empty": 1}
    capped, src = package_files(dist, max_package_bytes=len(code) + 10)
    assert len(capped) == 1 and src.skipped["package cap"] == 1


def test_dedupe_keeps_the_first_and_ignores_whitespace():
    files = {"json/x.py": "a = 1\nb = 2\n", "pkg/x.py": "a = 1\n\nb   = 2\n", "pkg/y.py": "c = 3\n"}
    kept, dropped = dedupe(files)
    assert list(kept) == ["json/x.py", "pkg/y.py"] and dropped == 1


def test_stdlib_keys_unchanged_and_this_project_excluded():
    stdlib_only, sources = code_corpus(packages=False)
    assert "json/decoder.py" in stdlib_only and sources[0].name == "python-stdlib"
    assert not any(k.startswith("test/") for k in stdlib_only)  # Lib/test: 61% of the bytes
    assert sources[0].skipped["tests"] > 500
    files, sources = code_corpus(packages=True, max_package_bytes=20_000)
    names = {s.name for s in sources}
    assert "dllm-serve" not in names and "tqdm" not in names  # ours; MPL-2.0 AND MIT
    assert "pydantic" in names                                 # MIT
    assert files["json/decoder.py"] == stdlib_only["json/decoder.py"]
    assert all(is_permissive(s.licence) for s in sources)
