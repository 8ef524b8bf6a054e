"""Function-completion cases whose answer is executed: held-out functions that carry a doctest,
or that some source in the corpus calls with literal arguments.

    cases = exec_cases(held_out_files, n=60, call_sources=all_files)   # mined and validated
    passed = run_cases(cases, bodies)        # bodies[i]: the model's body for cases[i]

A case is a function (top level, or for doctests also a method of a top-level class) in a
held-out file whose module imports in this interpreter. The model sees the file up to the end of
the function's docstring (or its def line) and writes the body; the completed function is
compiled into the imported module's namespace and checked one of two ways:
- doctest: its docstring holds a doctest the ORIGINAL body passes here; the completion's own
  doctest is run (a method is set on its class) and passes when every example does;
- call: the corpus or the standard library's test suite calls the function with literal
  arguments only (`parse_version('2.0dev0')`, `Number(3.14, prec=6)`), or every parameter has a
  default (`f()`); each such call is made with the original and with the completion, and the
  completion passes when every result equals the original's (same type, `==`). A call counts only
  if the original returns a plain value (numbers, strings, bytes, None, and containers of them),
  the same one twice, so that equality means the body computed the same thing.
Either way a case is kept only when no trivial body (`pass`, `return None`, `return 0`, returning
the first argument, ...) passes it, so a pass means the body computes something.

Completions are untrusted code: each batch runs in a child interpreter (`python -m
benchmarks.exec_cases`) with a per-case alarm, a 2 GiB address-space limit, a minimal environment
and a fresh temporary working directory; a case that crashes the child counts as failed and the
child is restarted for the rest. Call cases skip functions whose source touches files, processes,
sockets or the environment, and calls with absolute paths. This limits accidents, not an
adversary: it is no sandbox for code from a model one does not trust (run `dllm eval` on a
machine without secrets).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

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
    calls: list[str] = field(default_factory=list)  # call cases: `name(literal args)` sources;
                                                     # empty for a doctest case
    first_param: str | None = None  # call cases: what the "return the first argument" trivial
                                    # body returns


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
    if not path:  # a bare file name outside the standard library: no package to import it from
        return None
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


# A call case runs the ORIGINAL function too, with arguments mined from other people's code:
# functions whose source reaches outside the interpreter are left out.
_SIDE_EFFECTS = re.compile(
    r"\b(open|shutil|subprocess|socket|signal|threading|multiprocessing|asyncio|input|"
    r"remove|unlink|rmtree|rmdir|mkdir|makedirs|rename|chdir|kill|environ|exec|eval|"
    r"write|system|spawn|urlopen|connect|exit|register|atexit|setattr|delattr|globals|"
    r"setrecursionlimit|settrace|setprofile|modules)\b"
    r"|\bos\.(?!path\b|sep\b|fspath\b|linesep\b|fsencode\b|fsdecode\b)")
_NOT_CALLED = ("main", "run", "cli", "setup", "test", "_test")
MAX_CALLS = 8


def _call_functions(src: str, max_body_lines: int):
    """(FunctionDef, index of the body's first statement) for the top-level functions of `src`
    that a call case may run: undecorated, a body of at most `max_body_lines` on lines of its
    own, no side-effecting names in the source."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return
    for f in tree.body:
        if not isinstance(f, ast.FunctionDef) or f.decorator_list or f.end_lineno is None:
            continue
        if f.name in _NOT_CALLED or f.name.startswith("__"):
            continue
        first = 1 if ast.get_docstring(f, clean=False) is not None else 0
        if len(f.body) <= first or f.body[first].lineno == f.lineno:
            continue
        if f.end_lineno - f.body[first].lineno + 1 > max_body_lines:
            continue
        if _SIDE_EFFECTS.search(ast.get_source_segment(src, f) or ""):
            continue
        yield f, first


def _literal_call(node: ast.Call) -> bool:
    try:
        for a in node.args:
            if isinstance(a, ast.Starred):
                return False
            v = ast.literal_eval(a)
            if isinstance(v, str) and v.startswith(("/", "~")):
                return False
        for kw in node.keywords:
            if kw.arg is None:
                return False
            ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def call_sites(sources: dict[str, str], names: set[str]) -> dict[str, list[str]]:
    """name -> the distinct calls `name(...)` / `x.name(...)` in `sources` whose arguments are
    all literals, written as `name(args)`, in sorted order."""
    found: dict[str, set[str]] = {}
    if not names:
        return {}
    alternatives = "|".join(sorted(map(re.escape, names)))
    mention = re.compile(rf"\b(?:{alternatives})\(")
    for key in sorted(sources):
        src = sources[key]
        if not mention.search(src):
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else \
                fn.attr if isinstance(fn, ast.Attribute) else None
            if name in names and (node.args or node.keywords) and _literal_call(node):
                call = ast.Call(ast.Name(name, ast.Load()), node.args, node.keywords)
                text = ast.unparse(call)
                if len(text) <= 200:
                    found.setdefault(name, set()).add(text)
    return {k: sorted(v) for k, v in found.items()}


def stdlib_test_sources() -> dict[str, str]:
    """The standard library's own test suite (kept out of training), as call sites."""
    import sysconfig
    from pathlib import Path
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    out = {}
    for path in sorted(root.rglob("*.py")):
        try:
            out["test/" + path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return out


def mine_call_cases(files: dict[str, str], call_sources: dict[str, str],
                    max_body_lines: int = 12) -> list[ExecCase]:
    """Every candidate call case of `files` (not yet validated), in key order."""
    funcs = []
    for key in sorted(files):
        module = _module_for(key)
        if module is None:
            continue
        src = files[key]
        for f, first in _call_functions(src, max_body_lines):
            funcs.append((key, module, src, f, first))
    sites = call_sites(call_sources, {f.name for _, _, _, f, _ in funcs})
    out = []
    for key, module, src, f, first in funcs:
        a = f.args
        params = [x.arg for x in [*a.posonlyargs, *a.args]]
        required = len(params) - len(a.defaults) + sum(d is None for d in a.kw_defaults)
        calls = list(sites.get(f.name, []))
        if required == 0:
            calls.insert(0, f.name + "()")
        if not calls:
            continue
        lines = src.splitlines(keepends=True)
        start = f.body[first].lineno - 1
        out.append(ExecCase(key, module, f.name, "".join(lines[:start]),
                            "".join(lines[start:f.end_lineno]), f.col_offset, calls,
                            params[0] if params else None))
    return out


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    return env


def _run(cases: list[ExecCase], bodies: list[str]) -> list[dict]:
    """The child's report for each body (`passed`, and per call `calls` for a call case); one
    child interpreter per top-level package, restarted after a crash (the crashing case fails).
    Packages do not share a child: importing one can break another (pip's modules imported
    first make `setuptools._scripts` fail to import), and a case must not pass or fail by which
    cases ran before it."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.module.split(".")[0], []).append(i)
    results: dict[int, dict] = {}
    for todo in groups.values():
        _run_group(cases, bodies, todo, results)
    return [results[i] for i in range(len(cases))]


def _run_group(cases: list[ExecCase], bodies: list[str], todo: list[int],
               results: dict[int, dict]) -> None:
    while todo:
        jobs = [{"i": i, **asdict(cases[i]), "new_body": bodies[i]} for i in todo]
        with tempfile.TemporaryDirectory() as cwd:
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.exec_cases"],
                                      input=json.dumps(jobs), capture_output=True, text=True,
                                      cwd=cwd, env=_child_env(),
                                      timeout=CASE_TIMEOUT_S * len(jobs) + 60)
                stdout = proc.stdout
            except subprocess.TimeoutExpired as e:  # a case that outlives its alarm
                stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        # Results come back in job order; a line that is not the next expected one (a
        # completion writing to the real stdout) is ignored.
        n_done = 0
        for line in stdout.splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if n_done < len(todo) and isinstance(d, dict) and d.get("i") == todo[n_done]:
                results[todo[n_done]] = d
                n_done += 1
        left = todo[n_done:]
        if left:
            results[left[0]] = {"passed": False}  # the child died (or ran out of time) here
            left = left[1:]
        todo = left


def run_cases(cases: list[ExecCase], bodies: list[str]) -> list[bool]:
    """Whether each body passes its case (its doctest, or every call)."""
    return [bool(d.get("passed")) for d in _run(cases, bodies)]


TRIVIAL_BODIES = ("pass\n", "return None\n", "return 0\n", "return self\n", "return ''\n",
                  "return True\n", "return False\n", "return []\n")


def _trivial_bodies(case: ExecCase) -> list[str]:
    pad = " " * (case.indent + 4)
    out = [pad + t for t in TRIVIAL_BODIES]
    if case.first_param:
        out.append(f"{pad}return {case.first_param}\n")
    return out


def _drop_trivially_passed(cases: list[ExecCase]) -> list[ExecCase]:
    """The cases that no trivial body passes."""
    keep = [True] * len(cases)
    for k in range(max((len(_trivial_bodies(c)) for c in cases), default=0)):
        live = [i for i, c in enumerate(cases) if keep[i] and k < len(_trivial_bodies(c))]
        hits = run_cases([cases[i] for i in live], [_trivial_bodies(cases[i])[k] for i in live])
        for i, hit in zip(live, hits, strict=True):
            keep[i] = not hit
    return [c for c, good in zip(cases, keep, strict=True) if good]


def _validated_calls(cases: list[ExecCase]) -> list[ExecCase]:
    """Call cases cut to the calls the original body answers with a plain value, the same one
    twice (at most MAX_CALLS each); cases left with none are dropped."""
    out = []
    for c, d in zip(cases, _run(cases, [c.body for c in cases]), strict=True):
        calls = [call for call, ok in zip(c.calls, d.get("calls") or [], strict=False) if ok]
        if calls:
            out.append(ExecCase(**{**asdict(c), "calls": calls[:MAX_CALLS]}))
    return out


def exec_cases(files: dict[str, str], n: int = 60, per_file: int = 6,
               call_sources: dict[str, str] | None = None) -> list[ExecCase]:
    """Up to n validated cases, doctest cases first, at most `per_file` from one file (sympy's
    permutations.py alone holds 30 doctested methods). Doctest cases: the original body passes
    its own doctest here. Call cases: calls found in `call_sources` (default: `files`) plus `f()`
    where every parameter has a default, kept where the original answers them. Either kind is
    kept only if no trivial body passes it."""
    docs = mine_cases(files)
    ok = run_cases(docs, [c.body for c in docs])
    docs = _drop_trivially_passed([c for c, good in zip(docs, ok, strict=True) if good])
    calls = mine_call_cases(files, files if call_sources is None else call_sources)
    calls = _drop_trivially_passed(_validated_calls(calls))
    out, seen = [], {}
    for c in [*docs, *calls]:
        if seen.get(c.key, 0) < per_file:
            out.append(c)
            seen[c.key] = seen.get(c.key, 0) + 1
    return out[:n]


# --- the child ------------------------------------------------------------------------------
def _plain(v, depth: int = 0) -> bool:
    """A value whose `==` compares contents: numbers, strings, bytes, None, and containers of
    them (a custom class may compare equal to anything)."""
    if depth > 8:
        return False
    if type(v) in (type(None), bool, int, float, complex, str, bytes):
        return True
    if type(v) in (tuple, list, set, frozenset):
        return all(_plain(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _same(a, b) -> bool:
    """Equal and of the same types all the way down (`1 == True`, `[1] == [1.0]` are not)."""
    if type(a) is not type(b):
        return False
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _call_results(job: dict, mod, func) -> list[bool]:
    """Per call: the original answered with a plain value, the same twice, and `func` with the
    same value. Arguments are rebuilt for every call (a body may mutate them)."""
    orig = getattr(mod, job["qualname"])
    out = []
    for call in job["calls"]:
        node = ast.parse(call, mode="eval").body

        def run(f, node=node):
            args = [ast.literal_eval(a) for a in node.args]
            return f(*args, **{k.arg: ast.literal_eval(k.value) for k in node.keywords})
        try:
            want, again = run(orig), run(orig)
        except Exception:  # noqa: BLE001 - the original does not answer this call: not a case
            out.append(False)
            continue
        if not (_plain(want) and _same(want, again)):
            out.append(False)
            continue
        try:
            out.append(_same(want, run(func)))
        except Exception:  # noqa: BLE001 - untrusted code failing is a failed call
            out.append(False)
    return out


def _run_one(job: dict) -> dict:
    import doctest
    import importlib
    import textwrap

    mod = importlib.import_module(job["module"])
    # The def line (and its docstring) end `before`; the completion follows them.
    before_lines = job["before"].splitlines(keepends=True)
    name = job["qualname"].split(".")[-1]
    start = max(i for i, line in enumerate(before_lines)
                if line.lstrip().startswith(("def " + name, "async def " + name)))
    func_src = textwrap.dedent("".join(before_lines[start:]) + job["new_body"])
    ns = dict(vars(mod))
    exec(compile(func_src, f"<completion of {job['qualname']}>", "exec"), ns)
    func = ns[name]
    if job.get("calls"):
        calls = _call_results(job, mod, func)
        return {"passed": bool(calls) and all(calls), "calls": calls}
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
            return {"passed": False}
        for t in tests:
            runner.run(t, out=lambda s: None)
        res = runner.summarize(verbose=False)
        return {"passed": res.attempted > 0 and res.failed == 0}
    finally:
        if cls is not None:
            setattr(cls, name, original)


class CaseTimeout(BaseException):
    """A case ran past its alarm."""


def _child_main() -> None:
    import io
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))

    def alarm(signum, frame):
        # Not an Exception (the call runner and doctest swallow those, and a hang would then
        # outlive its alarm), and re-armed until the case's `finally` clears it.
        signal.alarm(1)
        raise CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    jobs = json.loads(sys.stdin.read())
    real_stdout = sys.stdout
    for job in jobs:
        sys.stdout = io.StringIO()  # a completion that prints must not corrupt the protocol
        signal.alarm(CASE_TIMEOUT_S)
        try:
            try:
                report = _run_one(job)
            finally:
                signal.alarm(0)
        except BaseException:  # noqa: BLE001 - any failure of untrusted code is a failed case
            report = {"passed": False}
        finally:
            signal.alarm(0)
            sys.stdout = real_stdout
        print(json.dumps({"i": job["i"], **report}), flush=True)


if __name__ == "__main__":
    _child_main()
