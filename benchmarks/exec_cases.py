"""Function-completion cases whose answer is executed: held-out functions that carry a doctest.

    cases = exec_cases(held_out_files, n=60)        # mined and validated (see exec_cases)
    passed = run_cases(cases, bodies)               # bodies[i]: the model's body for cases[i]

A case is a documented function (top level or a method of a top-level class) in a held-out file
whose module imports in this interpreter and whose docstring holds a doctest the ORIGINAL body
passes here. The model sees the file up to the end of the docstring and writes the body; the
completed function is compiled into the imported module's namespace (a method is set on its
class) and its own doctest is run. A body passes when every example of the doctest does.

Completions are untrusted code: each batch runs in a child interpreter (`python -m
benchmarks.exec_cases`) with a per-case alarm, a 2 GiB address-space limit, a minimal environment
and a fresh temporary working directory; a case that crashes the child counts as failed and the
child is restarted for the rest. This limits accidents, not an adversary: it is no sandbox for
code from a model one does not trust (run `dllm eval` on a machine without secrets).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

CASE_TIMEOUT_S = 5
CHILD_MEMORY_BYTES = 2 << 30


@dataclass
class ExecCase:
    key: str       # corpus key of the file
    module: str    # importable module name
    qualname: str  # "func" or "Class.method"
    before: str    # file text up to and including the docstring
    body: str      # the original body after the docstring (the reference answer)
    indent: int    # the def line's indentation


def _is_stdlib_key(key: str) -> bool:
    import sysconfig
    from pathlib import Path
    return (Path(sysconfig.get_paths()["stdlib"]) / key).exists()


def _module_for(key: str) -> str | None:
    """Corpus key -> importable module name: stdlib keys are paths from the stdlib root, package
    keys `<distribution>/<path in site-packages>`."""
    parts = key.split("/")
    if not parts[-1].endswith(".py"):
        return None
    path = parts if _is_stdlib_key(key) else parts[1:]
    mod = [*path[:-1], path[-1][:-3]]
    if mod and mod[-1] == "__init__":
        mod = mod[:-1]
    if not mod or not all(m.isidentifier() for m in mod):
        return None
    return ".".join(mod)


def _doctested_functions(src: str):
    """(qualname, FunctionDef) for top-level functions and methods of top-level classes whose
    docstring holds a doctest and whose body has a statement after the docstring."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return
    for node in tree.body:
        inner = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            inner = [(f"{node.name}.{f.name}", f) for f in node.body
                     if isinstance(f, ast.FunctionDef)]
        for qual, f in inner:
            doc = ast.get_docstring(f, clean=False)
            if doc and ">>>" in doc and len(f.body) >= 2 and f.end_lineno is not None:
                yield qual, f


def mine_cases(files: dict[str, str], max_body_lines: int = 12) -> list[ExecCase]:
    """Every candidate case of the files (not yet validated), in key order."""
    out = []
    for key in sorted(files):
        module = _module_for(key)
        if module is None:
            continue
        src = files[key]
        lines = src.splitlines(keepends=True)
        for qual, f in _doctested_functions(src):
            body_start = f.body[1].lineno - 1
            body = "".join(lines[body_start:f.end_lineno])
            if body.count("\n") > max_body_lines or f.decorator_list:
                continue
            out.append(ExecCase(key, module, qual, "".join(lines[:body_start]), body, f.col_offset))
    return out


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    return env


def run_cases(cases: list[ExecCase], bodies: list[str]) -> list[bool]:
    """Whether each body passes its case's doctest; one child interpreter per batch, restarted
    after a crash (the crashing case fails)."""
    todo = list(range(len(cases)))
    results: dict[int, bool] = {}
    while todo:
        jobs = [{"i": i, **asdict(cases[i]), "new_body": bodies[i]} for i in todo]
        with tempfile.TemporaryDirectory() as cwd:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.exec_cases"],
                                  input=json.dumps(jobs), capture_output=True, text=True,
                                  cwd=cwd, env=_child_env(),
                                  timeout=CASE_TIMEOUT_S * len(jobs) + 60)
        # Results come back in job order; a line that is not the next expected one (a
        # completion writing to the real stdout) is ignored.
        n_done = 0
        for line in proc.stdout.splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if n_done < len(todo) and isinstance(d, dict) and d.get("i") == todo[n_done]:
                results[todo[n_done]] = bool(d.get("passed"))
                n_done += 1
        left = todo[n_done:]
        if left:
            results[left[0]] = False  # the child died (or ran out of time) on this case
            left = left[1:]
        todo = left
    return [results[i] for i in range(len(cases))]


TRIVIAL_BODIES = ("pass\n", "return None\n", "return 0\n", "return self\n")


def exec_cases(files: dict[str, str], n: int = 60, per_file: int = 6) -> list[ExecCase]:
    """Up to n validated cases, at most `per_file` from one file (sympy's permutations.py alone
    holds 30 doctested methods): the original body passes its own doctest here, and no trivial
    body (`pass`, `return None`, ...) does, so a pass means the body computes something."""
    cand = mine_cases(files)
    ok = run_cases(cand, [c.body for c in cand])
    for trivial in TRIVIAL_BODIES:
        live = [i for i, good in enumerate(ok) if good]
        hits = run_cases([cand[i] for i in live], [" " * (cand[i].indent + 4) + trivial for i in live])
        for i, hit in zip(live, hits, strict=True):
            ok[i] = not hit
    out, seen = [], {}
    for c, good in zip(cand, ok, strict=True):
        if good and seen.get(c.key, 0) < per_file:
            out.append(c)
            seen[c.key] = seen.get(c.key, 0) + 1
    return out[:n]


# --- the child ------------------------------------------------------------------------------
def _run_one(job: dict) -> bool:
    import doctest
    import importlib
    import textwrap

    mod = importlib.import_module(job["module"])
    # The def line and its docstring end `before`; the completion follows them.
    before_lines = job["before"].splitlines(keepends=True)
    name = job["qualname"].split(".")[-1]
    start = max(i for i, line in enumerate(before_lines)
                if line.lstrip().startswith(("def " + name, "async def " + name)))
    func_src = textwrap.dedent("".join(before_lines[start:]) + job["new_body"])
    ns = dict(vars(mod))
    exec(compile(func_src, f"<completion of {job['qualname']}>", "exec"), ns)
    func = ns[name]
    cls = getattr(mod, job["qualname"].split(".")[0]) if "." in job["qualname"] else None
    # Later cases run in this same interpreter: the class gets its own method back afterwards.
    original = cls.__dict__[name] if cls is not None else None
    if cls is not None:
        setattr(cls, name, func)
        func.__qualname__ = job["qualname"]
    try:
        finder = doctest.DocTestFinder(recurse=False)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        tests = finder.find(func, job["qualname"], module=mod, globs=ns)
        if not tests or not any(t.examples for t in tests):
            return False
        for t in tests:
            runner.run(t, out=lambda s: None)
        res = runner.summarize(verbose=False)
        return res.attempted > 0 and res.failed == 0
    finally:
        if cls is not None:
            setattr(cls, name, original)


def _child_main() -> None:
    import io
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))

    def alarm(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    jobs = json.loads(sys.stdin.read())
    real_stdout = sys.stdout
    for job in jobs:
        sys.stdout = io.StringIO()  # a completion that prints must not corrupt the protocol
        signal.alarm(CASE_TIMEOUT_S)
        try:
            passed = _run_one(job)
        except BaseException:  # noqa: BLE001 - any failure of untrusted code is a failed case
            passed = False
        finally:
            signal.alarm(0)
            sys.stdout = real_stdout
        print(json.dumps({"i": job["i"], "passed": bool(passed)}), flush=True)


if __name__ == "__main__":
    _child_main()
