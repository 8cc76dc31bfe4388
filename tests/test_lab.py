"""The lab: `nanovllm.lab` says "not attempted" / "wrong: ..." / "correct" and never shows the answer; every
chapter's exercises ship unanswered; filled in with the solutions, every check says "correct"."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
import torch
from lab_fill import exercise_cells, fill, run_filled, statuses

from nanovllm.lab import CORRECT, NOT_ATTEMPTED, Lab, compare, solution_blocks, solutions_dir

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
LAB_CHAPTERS = sorted(p for p in CHAPTERS.glob("[0-9][0-9]_*.ipynb") if list(solutions_dir().glob(p.stem[:2] + "*.py")))


@pytest.fixture
def toy_lab(tmp_path, monkeypatch):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "99_toy.py").write_text(
        "# %% exercise 1\ndef double(x):\n    return 2 * x * scale\n\n"
        "# %% exercise 2\nanswer = {'a': [1, 2.5]}\n\n"
        "# %% exercise 3\nclass Counter:\n    def bump(self, n):\n        return n + 1\n")
    monkeypatch.chdir(tmp_path)
    return Lab("99")


def run_check(lab, capsys, *args, **kwargs):
    lab.check(*args, **kwargs)
    return capsys.readouterr().out.strip()


def test_statuses(toy_lab, capsys):
    def stub(x):
        raise NotImplementedError

    ns = {"scale": 1, "double": stub, "answer": ...}
    assert run_check(toy_lab, capsys, 1, "double", 3, namespace=ns) == f"Exercise 1: {NOT_ATTEMPTED}"
    assert run_check(toy_lab, capsys, 2, "answer", namespace=ns) == f"Exercise 2: {NOT_ATTEMPTED}"
    assert run_check(toy_lab, capsys, 2, "missing", namespace=ns) == f"Exercise 2: {NOT_ATTEMPTED}"
    ns.update(double=lambda x: x + x, answer={"a": [1, 2.5000001]})
    assert run_check(toy_lab, capsys, 1, "double", 3, namespace=ns) == f"Exercise 1: {CORRECT}"
    assert run_check(toy_lab, capsys, 2, "answer", tol=1e-6, namespace=ns) == f"Exercise 2: {CORRECT}"
    assert toy_lab.results == {"1": CORRECT, "2": CORRECT}
    ns.update(double=lambda x: x * 3, answer={"a": [1, 3]})
    out = run_check(toy_lab, capsys, 1, "double", 3, hint="twice", namespace=ns)
    assert out == "Exercise 1: wrong: got 9 (hint: twice)"  # what was got, never what was expected
    assert "2.5" not in run_check(toy_lab, capsys, 2, "answer", namespace=ns)
    ns["double"] = lambda x: 1 / 0
    assert "wrong: raised ZeroDivisionError" in run_check(toy_lab, capsys, 1, "double", 3, namespace=ns)
    assert toy_lab.results["1"].startswith("wrong")


def test_the_solution_runs_in_a_copy_of_the_namespace(toy_lab, capsys):
    ns = {"scale": 10, "double": lambda x: 20 * x}
    assert run_check(toy_lab, capsys, 1, "double", 1, namespace=ns).endswith(CORRECT)  # the solution sees scale
    assert ns["double"](1) == 20  # the reader's definition is left alone


def test_build_exercises_are_checked_by_a_test(toy_lab, capsys):
    class Stub:
        def bump(self, n):
            raise NotImplementedError

    class Wrong:
        def bump(self, n):
            return n

    def same_bumps(mine, ref):
        for n in range(3):
            assert mine().bump(n) == ref().bump(n), f"bump({n}) gave {mine().bump(n)}"

    for cls, status in ((Stub, NOT_ATTEMPTED), (Wrong, "wrong: bump(0) gave 0"), (toy_lab, None)):
        if status is None:  # the solution itself
            cls = toy_lab.solution(3, {})["Counter"]
            status = CORRECT
        out = run_check(toy_lab, capsys, 3, "Counter", test=same_bumps, namespace={"Counter": cls})
        assert out.startswith(f"Exercise 3: {status}")  # (pytest adds its own explanation to asserts in tests)


def test_compare():
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7])) is None
    assert "shape" in compare(torch.zeros(2), torch.zeros(3))
    assert compare(torch.tensor([1, 2]), torch.tensor([1, 3])) == "the values differ"
    assert compare(torch.tensor([float("-inf"), 1.0]), torch.tensor([float("-inf"), 1.0])) is None
    assert compare((1, 2), [1, 2]) is None and compare(True, 1) is not None
    assert compare(0.1 + 0.2, 0.3) is None and compare(1, 2) == "got 1"


@pytest.mark.parametrize("path", LAB_CHAPTERS, ids=lambda p: p.stem[:2])
def test_chapter_ships_unanswered(path):
    """Exercise cells hold stubs, one per solution block; the stored checks say "not attempted"."""
    nb = nbformat.read(path, as_version=4)
    blocks = solution_blocks(path.stem[:2])
    cells = exercise_cells(nb)
    assert [str(c.metadata.get("exercise")) for c in cells] == list(blocks)
    for cell in cells:
        assert "NotImplementedError" in cell.source or "= ..." in cell.source, cell.source
        assert not cell.get("outputs"), "an exercise cell ships without outputs"
    stored = statuses(nb)
    assert stored == dict.fromkeys(blocks, NOT_ATTEMPTED)
    assert solutions_left_in(nb, blocks) == []  # no solution in the notebook itself


# what a stub may share with its solution: headers (at any indentation: a class's methods), decorators, imports,
# comments; docstrings are skipped too
SHARED_WITH_STUBS = ("def ", "async def ", "class ", "@", "import ", "from ", "#")


def answer_lines(block: str) -> list[str]:
    """The lines of a solution block that are its answer: code, stripped of its indentation, longer than 20
    characters, and none of the lines a stub shares with it."""
    lines, in_docstring = [], False
    for line in block.splitlines():
        code = line.strip()
        if in_docstring or code.startswith(('"""', "'''")):
            in_docstring ^= (code.count('"""') + code.count("'''")) % 2 == 1  # opened or closed here
        elif len(code) > 20 and not code.startswith(SHARED_WITH_STUBS):
            lines.append(code)
    return lines


def solutions_left_in(nb, blocks: dict[str, str]) -> list[str]:
    """Where the notebook holds a solution: a line of its answer in its own exercise cell, or the whole answer in
    any cell, code or prose.  (One line of an answer elsewhere is no leak: a solution may reuse a line that the
    chapter wrote.)"""
    found = []
    for cell in nb.cells:
        lines = {line.strip() for line in cell.source.splitlines()}
        own = str(cell.metadata.get("exercise")) if "exercise" in cell.metadata.get("tags", []) else None
        for key, block in blocks.items():
            answer = answer_lines(block)
            there = [line for line in answer if line in lines]
            if there and (key == own or len(there) == len(answer)):
                found.append(f"exercise {key}'s solution in cell {cell.get('id')}: {there[0]!r}")
    return found


@pytest.mark.parametrize("path", LAB_CHAPTERS, ids=lambda p: p.stem[:2])
def test_the_no_solution_check_catches_a_solution(path):
    """The check can fail: each solution block, left in its exercise cell or pasted whole into a cell of its own,
    is found."""
    nb = nbformat.read(path, as_version=4)
    blocks = solution_blocks(path.stem[:2])
    for i, cell in enumerate(nb.cells):
        if "exercise" not in cell.metadata.get("tags", []):
            continue
        key = str(cell.metadata["exercise"])
        assert answer_lines(blocks[key]), f"exercise {key}: no line of its solution can be told from a stub"
        filled, pasted = copy.deepcopy(nb), copy.deepcopy(nb)
        filled.cells[i].source = blocks[key]
        pasted.cells.append(nbformat.v4.new_code_cell(blocks[key]))
        for notebook in (filled, pasted):
            assert any(f.startswith(f"exercise {key}'s") for f in solutions_left_in(notebook, blocks)), key


def test_the_no_solution_check_lets_a_stub_share_headers_with_its_solution():
    # a method's header, indented in its class, is in the stub as in the solution: only the method's body is answer
    stub = ("class FIFOAllocator(PagedAllocator):\n    def take_free_block(self) -> int:\n"
            "        raise NotImplementedError\n")
    solution = ("class FIFOAllocator(PagedAllocator):\n    def take_free_block(self) -> int:\n"
                "        # the block cached first\n        return self.free.pop(next(iter(self.cached_order)))\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(stub, metadata={"tags": ["exercise"],
                                                                                   "exercise": 1})])
    assert answer_lines(solution) == ["return self.free.pop(next(iter(self.cached_order)))"]
    assert solutions_left_in(nb, {"1": solution}) == []
    nb.cells[0].source = solution
    [found] = solutions_left_in(nb, {"1": solution})
    assert found.startswith("exercise 1's solution") and found.endswith("self.free.pop(next(iter(self.cached_order)))'")


@pytest.mark.slow
@pytest.mark.parametrize("path", LAB_CHAPTERS, ids=lambda p: p.stem[:2])
def test_chapter_with_solutions_filled_in(path):
    executed = run_filled(path)
    assert statuses(executed) == dict.fromkeys(solution_blocks(path.stem[:2]), CORRECT)


def test_fill_refuses_a_cell_without_solution():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = ...", metadata={"tags": ["exercise"],
                                                                                          "exercise": "nope"})])
    with pytest.raises(KeyError, match="nope"):
        fill(nb, LAB_CHAPTERS[0].stem[:2])
