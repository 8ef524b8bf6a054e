"""Executed function-completion cases: a right body passes, wrong, hanging and crashing ones fail,
and one bad completion never costs another case its result."""

import textwrap

from benchmarks import exec_cases as ec

MODULE = textwrap.dedent('''\
    def add(a, b):
        """Sum.

        >>> add(2, 3)
        5
        """
        c = a + b
        return c


    class Box:
        def __init__(self, v):
            self.v = v

        def double(self):
            """
            >>> Box(4).double()
            8
            """
            w = self.v * 2
            return w
''')


def test_cases_are_mined_validated_and_run(tmp_path, monkeypatch):
    (tmp_path / "toymod.py").write_text(MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    files = {"toydist/toymod.py": MODULE}
    cases = ec.exec_cases(files)
    assert [c.qualname for c in cases] == ["add", "Box.double"]
    add, double = cases
    assert add.body == "    c = a + b\n    return c\n"
    right = [add.body, double.body]
    assert ec.run_cases(cases, right) == [True, True]
    wrong = ["    return a - b\n", "        return self.v\n"]
    assert ec.run_cases(cases, wrong) == [False, False]
    # a hang, then a crash of the child interpreter: both fail, the case after each still runs
    hang = ["    while True:\n        pass\n", double.body]
    assert ec.run_cases(cases, hang) == [False, True]
    crash = ["    import os\n    os._exit(3)\n", double.body]
    assert ec.run_cases(cases, crash) == [False, True]
    # a replaced method does not leak into the next case of the same child
    assert ec.run_cases([double, double], ["        return 0\n", double.body]) == [False, True]


def test_forged_result_lines_and_crashes_cost_no_other_case(tmp_path, monkeypatch):
    (tmp_path / "toymod.py").write_text(MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    cases = ec.mine_cases({"toydist/toymod.py": MODULE})
    # case 0 writes a forged result line for case 1 straight to the process's stdout; case 1
    # then kills the child before it reports: case 1 must still fail
    forge = ('    import os\n    os.write(1, b\'{"i": 1, "passed": true}\\n\')\n'
             '    return a + b\n')
    crash = "        import os\n        os._exit(3)\n"
    assert ec.run_cases(cases, [forge, crash]) == [True, False]


CALLED = textwrap.dedent('''\
    import random


    def slug(text, sep="-"):
        """Lower-case words joined by `sep`."""
        words = text.lower().split()
        return sep.join(words)


    def echo(x):
        y = x
        return y


    def boxed(n):
        out = object()
        return out


    def roll(n):
        r = random.random()
        return r * n


    def spin():
        while True:
            pass
        return 1


    def wipe(path):
        import shutil
        shutil.rmtree(path)
        return 1
''')

CALLER = textwrap.dedent('''\
    slug("Hello World")
    x.slug("A  b C", sep="_")
    slug(name)            # not literal: not a case's call
    echo("same")
    boxed(3)
    roll(2)
    spin()
    wipe("somewhere")
''')


def test_call_cases_compare_with_the_original(tmp_path, monkeypatch):
    (tmp_path / "calledmod.py").write_text(CALLED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    files = {"toydist/calledmod.py": CALLED}
    mined = {c.qualname: c for c in ec.mine_call_cases(files, {"use.py": CALLER})}
    # shutil in the body: never run, not even the original
    assert "wipe" not in mined
    assert mined["slug"].calls == ["slug('A  b C', sep='_')", "slug('Hello World')"]
    assert mined["slug"].body == '    words = text.lower().split()\n    return sep.join(words)\n'
    assert mined["slug"].before.endswith('"""Lower-case words joined by `sep`."""\n')
    # kept: slug. Dropped: echo (returning the argument passes), boxed (an object, whose `==`
    # is identity), roll (a different answer each time), spin (the original never returns)
    cases = ec.exec_cases(files, call_sources={"use.py": CALLER})
    assert [(c.qualname, c.calls) for c in cases] == [("slug", mined["slug"].calls)]
    slug = cases[0]
    assert ec.run_cases([slug] * 4, [
        slug.body,
        "    return sep.join(w for w in text.lower().split())\n",  # another right body
        "    return sep.join(text.split())\n",           # wrong on both calls
        "    return text.lower().replace(' ', sep)\n",   # right on 'Hello World' only
    ]) == [True, True, False, False]


def test_a_hanging_call_fails_and_the_next_case_still_runs(tmp_path, monkeypatch):
    (tmp_path / "calledmod.py").write_text(CALLED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    slug = ec.exec_cases({"toydist/calledmod.py": CALLED}, call_sources={"use.py": CALLER})[0]
    # a hang that swallows every Exception (the alarm is not one)
    hang = "    while True:\n        try:\n            pass\n        except Exception:\n            pass\n"
    assert ec.run_cases([slug, slug], [hang, slug.body]) == [False, True]


def test_equal_means_same_types_all_the_way_down():
    assert ec._same({"a": (1, "b")}, {"a": (1, "b")})
    assert not ec._same(1, True)          # 1 == True in Python
    assert not ec._same([1], [1.0])
    assert not ec._same((1, 2), [1, 2])
    assert ec._plain({"k": [1, 2.5, None, b"x", frozenset({1})]})
    assert not ec._plain([object()])
