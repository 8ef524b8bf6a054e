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
